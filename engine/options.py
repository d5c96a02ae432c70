"""Run configuration: one dataclass per concern, each field with a one-line help (torchtitan's
`job_config.py` sections). The CLI is generated from these classes; a JSON or TOML file given with
`--config` sets the same fields (section name → dataclass, e.g. `[objective] temperature = 4.0`),
and flags on the command line win over the file.
"""

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


def opt(default, help: str):
    """A dataclass field with its CLI help."""
    if isinstance(default, list | tuple | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataOptions:
    data: list[str] = opt(
        [], "text files or folders (.txt/.json/.jsonl/.csv or a save_to_disk folder); default: bundled BBC News"
    )
    text_column: str = opt("text", "column holding the text in json/csv/datasets inputs")
    max_seq_len: int = opt(128, "longest sequence in tokens, [CLS] and [SEP] included; longer documents are split")
    min_seq_len: int = opt(12, "shorter sequences are dropped (the original drops <= 11 tokens)")
    heldout_fraction: float = opt(0.05, "fraction of sequences held out for evaluation (deterministic)")
    batch_size: int = opt(32, "sequences per micro-batch")
    cache_dir: str = opt("", "tokenization cache folder; default: <out>/cache")


@dataclass
class MaskingOptions:
    mlm_probability: float = opt(0.15, "fraction of real tokens chosen for MLM per batch")
    mask_replace: float = opt(0.8, "of the chosen tokens, the fraction replaced by [MASK]")
    random_replace: float = opt(0.1, "of the chosen tokens, the fraction replaced by a random token")
    mlm_smoothing: float = opt(0.7, "weight choice by token count^-s (0 turns it off)")


@dataclass
class ObjectiveOptions:
    temperature: float = opt(2.0, "softmax temperature T of the KD term")
    alpha_ce: float = opt(5.0, "weight of the KD (distillation) term; 0 switches it off")
    alpha_mlm: float = opt(2.0, "weight of the MLM cross-entropy; 0 switches it off")
    alpha_cos: float = opt(1.0, "weight of the cosine loss on last hidden states; 0 switches it off")
    restrict_ce_to_mask: bool = opt(False, "KD only on masked positions instead of all non-pad ones")
    fused_head: bool = opt(True, "LM-head-fused loss (no [tokens x vocab] logits); off: project then loss")


@dataclass
class OptimOptions:
    lr: float = opt(5e-4, "peak learning rate")
    betas: list[float] = opt([0.9, 0.98], "AdamW betas")
    eps: float = opt(1e-6, "AdamW epsilon")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup: float = opt(0.05, "warmup as a fraction of the optimizer steps")
    clip: float = opt(5.0, "gradient clipping max norm (0: off)")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    steps: int = opt(1000, "optimizer steps")


@dataclass
class RunOptions:
    out: str = opt("runs/pretrain", "output folder (checkpoints, student, metrics, report)")
    precision: str = opt("auto", "auto (bf16 on capable CUDA, fp32 on CPU), bf16, fp16 (dynamic loss scaling) or fp32")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = opt(0, "seed of data order, masking, dropout and initialization")
    compile: bool = opt(False, "torch.compile the student and teacher encoders")
    log_every: int = opt(10, "optimizer steps between metric lines")
    eval_every: int = opt(0, "optimizer steps between evaluations (0: only at the end)")
    save_every: int = opt(0, "optimizer steps between checkpoints (0: only at the end)")
    eval_batches: int = opt(20, "held-out batches per evaluation (0: all)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = opt(False, "replace whatever run --out holds")
    progress: bool = opt(True, "show a progress bar")


def _flag_type(tp):
    """(argparse type, nargs, is_bool) for a dataclass field type."""
    if tp is bool:
        return None, None, True
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return inner, "+", False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0])
    return tp, None, False


def add_options(parser: argparse.ArgumentParser, *sections: type, positional: str | None = None) -> None:
    """Add one flag per field of each dataclass in `sections` (`--max-seq-len`, `--no-progress`)."""
    for section in sections:
        group = parser.add_argument_group(section.__name__.removesuffix("Options").lower())
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            tp, nargs, is_bool = _flag_type(hints[f.name])
            name = "--" + f.name.replace("_", "-")
            help_ = f.metadata.get("help", "")
            if is_bool:
                group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            else:
                group.add_argument(name, dest=f.name, type=tp, nargs=nargs, default=None, help=help_)


def _load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist; pass a .json or .toml file to --config")
    if p.suffix == ".toml":
        import tomllib

        return tomllib.loads(p.read_text())
    if p.suffix == ".json":
        return json.loads(p.read_text())
    raise ValueError(f"config file {p}: unknown format {p.suffix!r}; use .json or .toml")


def build_options(args: argparse.Namespace, *sections: type, profile: dict | None = None) -> list:
    """Instantiate each dataclass from defaults ← `profile` (flat field → value) ← config file
    (sections or flat keys) ← flags: each later source wins."""
    file_cfg = _load_config_file(args.config) if getattr(args, "config", None) else {}
    known = {s.__name__.removesuffix("Options").lower() for s in sections}
    all_fields = {f.name for s in sections for f in dataclasses.fields(s)}
    for key, value in file_cfg.items():
        if key not in known and key not in all_fields:
            raise ValueError(f"config file: unknown key {key!r}; known sections: {sorted(known)}")
        if key in known and isinstance(value, dict):
            bad = set(value) - all_fields
            if bad:
                raise ValueError(f"config file: unknown option(s) {sorted(bad)} in section [{key}]")
    out = []
    for section in sections:
        values = dict(profile or {})
        values.update({k: v for k, v in file_cfg.items() if not isinstance(v, dict)})
        values.update(file_cfg.get(section.__name__.removesuffix("Options").lower(), {}))
        kwargs = {}
        for f in dataclasses.fields(section):
            if getattr(args, f.name, None) is not None:
                kwargs[f.name] = getattr(args, f.name)
            elif f.name in values:
                kwargs[f.name] = values[f.name]
        out.append(section(**kwargs))
    return out


def to_dict(*options) -> dict:
    """Options as a JSON-able dict keyed by section name (what a run records and a resume checks)."""
    return {type(o).__name__.removesuffix("Options").lower(): dataclasses.asdict(o) for o in options}

"""Run configuration: one dataclass per concern, each field with a one-line help (torchtitan's `job_config.py`
sections). The CLI is generated from these classes; a JSON or TOML file given with `--config` sets the same fields
(section name → dataclass, e.g. `[objective] temperature = 4.0`, or flat keys), and flags win over the file.

Commands and their sections (each tuple is a command's whole configuration, in `--help` order):
    pretrain      PRETRAIN_SECTIONS   model, data, masking, objective, optim, run
    adapt-head    ADAPT_SECTIONS      adapt, data, masking, optim, run
    finetune      FINETUNE_SECTIONS   finetune, taskdata, optim, run
    task          TASK_SECTIONS       task, taskdata, kd, optim, run
    init-student  INIT_STUDENT_SECTIONS
    cache-teacher CACHE_TEACHER_SECTIONS  cacheteacher, taskdata, masking, run
    peek          PEEK_SECTIONS       peek
    ablate        ABLATE_SECTIONS     ablate, then pretrain's

Names: the pretraining flags keep the names of the original DistilBERT code, which users of the paper know, though
two of them say "ce" for the *distillation* term: `--alpha-ce` is the weight of the KD term (KL at temperature T)
and `--restrict-ce-to-mask` restricts the *KD* rows to the masked positions. Inside the engine those are called
`kd_weight` and `kd_masked_only` (`ObjectiveOptions.kd_weight` / `.kd_masked_only`), and the kernels' `ce_weight`
always means the hard-label cross-entropy (the MLM term here, weighted by `--alpha-mlm`).

This module imports neither torch nor transformers, so `distill --help` answers at once.
"""

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with its CLI help (and, for a closed set of values, its choices)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, list | tuple | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


TASKS = ("classification", "qa")
ARCHS = ("distilbert", "bert")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


# ---- pretraining (distill pretrain, distill adapt-head) -------------------------------------------------------------


@dataclass
class ModelOptions:
    teacher: str = opt("", "teacher checkpoint folder with an MLM head (default: the bundled MiniLM, head adapted)")
    student: str = opt("", "student checkpoint folder (default: initialized from teacher layers)")
    student_arch: str = opt("distilbert", "architecture of a student made from the teacher", ARCHS)
    student_layers: list[int] = opt([], "teacher layers the student starts from (default: spread evenly)")
    student_num_layers: int = opt(0, "depth of a student made from the teacher (0: half the teacher's)")
    teacher_cache: str = opt(
        "", "train from a teacher cache (`distill cache-teacher --task mlm`: static masking) with no teacher in memory"
    )


@dataclass
class AdaptOptions:
    model: str = opt("", "encoder-only checkpoint to give an MLM head (default: the bundled MiniLM)")
    train_encoder: bool = opt(False, "train the encoder too (frozen by default: only the head learns)")


@dataclass
class DataOptions:
    data: list[str] = opt(
        [], "text files or folders (.txt/.json/.jsonl/.csv or a save_to_disk folder); default: bundled BBC News"
    )
    text_column: str = opt("text", "column holding the text in json/csv/datasets inputs")
    max_seq_len: int = opt(128, "longest sequence in tokens, [CLS] and [SEP] included; longer documents are split")
    min_seq_len: int = opt(12, "shorter sequences are dropped (the original drops <= 11 tokens)")
    heldout_fraction: float = opt(0.05, "fraction of sequences held out for evaluation (deterministic)")
    batch_size: int = opt(32, "sequences per micro-batch, all processes together (torchrun: each takes 1/N of it)")
    cache_dir: str = opt("", "tokenization cache folder; default: <out>/cache")
    tokenize_workers: int = opt(0, "processes that tokenize the corpus into its token store (0: one per CPU core)")


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

    # The engine's names for the two flags that say "ce" for the distillation term (module docstring).
    @property
    def kd_weight(self) -> float:
        """Weight of the KD term (`--alpha-ce`)."""
        return self.alpha_ce

    @property
    def kd_masked_only(self) -> bool:
        """KD rows are the masked positions only (`--restrict-ce-to-mask`)."""
        return self.restrict_ce_to_mask


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
    precision: str = opt("auto", "auto: bf16 on capable CUDA, fp32 on CPU; fp16 uses dynamic loss scaling", PRECISIONS)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    seed: int = opt(0, "seed of data order, masking, dropout and initialization")
    compile: bool = opt(False, "torch.compile the student and teacher encoders")
    fsdp: bool = opt(
        False, "under torchrun, shard student and teacher over the processes (FSDP2) instead of replicating them (DDP)"
    )
    log_every: int = opt(10, "optimizer steps between metric lines")
    eval_every: int = opt(0, "optimizer steps between evaluations (0: only at the end)")
    save_every: int = opt(0, "optimizer steps between checkpoints (0: only at the end)")
    eval_batches: int = opt(20, "held-out batches per evaluation (0: all)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = opt(False, "replace whatever run --out holds")
    progress: bool = opt(True, "show a progress bar")


# ---- task-specific fine-tuning and distillation (distill finetune, distill task) -------------------------------------


@dataclass
class FinetuneOptions:
    task: str = opt("classification", "the task's head and data format", TASKS)
    model: str = opt("", "checkpoint to fine-tune (Hugging Face BERT/DistilBERT folder); default: the bundled MiniLM")
    latency_iters: int = opt(10, "batch-1 forward passes timed for the latency figure (0: no speed figures)")


@dataclass
class TaskOptions:
    task: str = opt("classification", "the task's head and data format", TASKS)
    teacher: str = opt("", "fine-tuned teacher checkpoint with the task's head (make one with `distill finetune`)")
    student: str = opt("", "student checkpoint (default: initialized from --student-from's layers)")
    student_from: str = opt("", "checkpoint a student is initialized from without --student (default: the teacher)")
    student_arch: str = opt("distilbert", "architecture of an initialized student", ARCHS)
    student_num_layers: int = opt(0, "depth of an initialized student (0: half of --student-from's)")
    baseline: bool = opt(True, "also fine-tune the same student without a teacher, for the report")
    teacher_cache: str = opt("", "train from a teacher cache (`distill cache-teacher`) with no teacher in memory")
    latency_iters: int = opt(10, "batch-1 forward passes timed per model for the latency figure (0: no speed figures)")


@dataclass
class TaskDataOptions:
    data: list[str] = opt(
        [], "training data: csv/tsv/json/jsonl, a save_to_disk folder or <dir>/<label>/*.txt; qa: a SQuAD v1.1 JSON"
    )
    validation_data: list[str] = opt([], "validation data in the same form (default: split off --data)")
    validation_fraction: float = opt(0.2, "share of --data held out for validation when --validation-data is not given")
    split_seed: int = opt(0, "seed of that split (kept apart from --seed so a teacher never sees the student's split)")
    text_column: str = opt("text", "column holding the text (csv/json/datasets)")
    label_column: str = opt("label", "column holding the label name (csv/json/datasets)")
    max_seq_len: int = opt(0, "tokens per sequence or QA window, special tokens included (0: 128, qa 384)")
    batch_size: int = opt(
        32,
        "sequences (QA: windows) per micro-batch, in training and evaluation; all processes together (torchrun: "
        "each trains on 1/N of it)",
    )
    epochs: float = opt(0.0, "passes over the training data; > 0 sets --steps from it")
    doc_stride: int = opt(128, "qa: context tokens shared by consecutive windows (0: one window, long contexts fail)")
    max_query_len: int = opt(64, "qa: questions are cut to this many tokens")
    max_answer_len: int = opt(30, "qa: longest predicted answer in tokens")
    n_best: int = opt(20, "qa: top start and end positions paired per window when decoding")


@dataclass
class KDOptions:
    alpha: float = opt(0.5, "classification: weight α of the label cross-entropy; the KD term gets 1 − α")
    alpha_ce: float = opt(0.5, "qa: weight of the KD term on start and end logits")
    alpha_qa: float = opt(0.5, "qa: weight of the start/end cross-entropy")
    temperature: float = opt(2.0, "softmax temperature T of the KD term")


# ---- student initialization (distill init-student) ------------------------------------------------------------------


@dataclass
class InitStudentOptions:
    teacher: str = opt("", "teacher checkpoint folder (Hugging Face layout)")
    out: str = opt("", "folder for the student checkpoint")
    layers: list[int] = opt([], "teacher layers to copy (default: spread evenly, 12 -> 6 is 0 2 4 7 9 11)")
    num_layers: int = opt(0, "student depth (0: half the teacher's)")
    arch: str = opt("distilbert", "student architecture", ARCHS)
    fold_token_type: bool = opt(
        False,
        "add the teacher's token-type-0 embedding to the positions (DistilBERT has none), so that the student's "
        "outputs equal the chosen teacher layers'; the original DistilBERT drops it",
    )


# ---- the tutorial experiments (distill peek, distill ablate) --------------------------------------------------------

# The DistilBERT paper's ablation (Table 4), by name; `engine.ablate.VARIANTS` says what each changes.
ABLATION_VARIANTS = ("triple", "no-kd", "no-cos", "no-mlm", "random-init")


@dataclass
class PeekOptions:
    model: str = opt("", "checkpoint with an MLM head (default: the bundled MiniLM teacher, its head trained once)")
    text: str = opt("", "text with one [MASK] where the word to predict goes (default: the example named above)")
    temperatures: list[float] = opt([1.0, 2.0, 5.0], "softmax temperatures T")
    top_k: int = opt(5, "most probable tokens shown when no --candidates are given")
    candidates: list[str] = opt(
        [], "words of one token each, shown renormalized over themselves and as a share of the whole vocabulary"
    )
    student: str = opt("", "a second checkpoint (a distilled student) shown beside --model, with their KL at each T")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")


@dataclass
class AblateOptions:
    variants: list[str] = opt(
        list(ABLATION_VARIANTS),
        "variants to run, in order (names, or one comma-separated list): triple; no-kd, no-cos, no-mlm (that term's "
        "alpha set to 0); random-init (the triple loss from a randomly initialized student of the same shape)",
    )


# ---- teacher caches (distill cache-teacher) --------------------------------------------------------------------------

CACHE_TASKS = ("classification", "qa", "mlm")


@dataclass
class CacheTeacherOptions:
    task: str = opt("classification", "the teacher's head and data: a task, or mlm (pretraining)", CACHE_TASKS)
    teacher: str = opt("", "teacher checkpoint (a fine-tuned task model, or one with an MLM head for mlm)")
    top_k: int = opt(64, "logits kept per row with their ids (the whole row when K ≥ classes; QA keeps every position)")
    temperature: float = opt(2.0, "softmax temperature T of the KD term the cache is for (its log-sum-exp is at T)")
    mask_copies: int = opt(4, "mlm: fixed masked copies of each sequence (static masking, cycled through by epoch)")
    restrict_ce_to_mask: bool = opt(False, "mlm: keep the teacher's rows at masked positions only (as the KD run)")
    hidden: bool = opt(False, "mlm: also keep the last hidden states (bf16) of every real token, for the cosine term")
    min_seq_len: int = opt(12, "mlm: shorter sequences are dropped (as `distill pretrain --min-seq-len`)")
    heldout_fraction: float = opt(0.05, "mlm: fraction held out (as `distill pretrain --heldout-fraction`)")
    shard_size: int = opt(4096, "examples (mlm: sequences) per shard: the unit of resumption and of multi-process work")


PRETRAIN_SECTIONS = (ModelOptions, DataOptions, MaskingOptions, ObjectiveOptions, OptimOptions, RunOptions)
ADAPT_SECTIONS = (AdaptOptions, DataOptions, MaskingOptions, OptimOptions, RunOptions)
FINETUNE_SECTIONS = (FinetuneOptions, TaskDataOptions, OptimOptions, RunOptions)
TASK_SECTIONS = (TaskOptions, TaskDataOptions, KDOptions, OptimOptions, RunOptions)
INIT_STUDENT_SECTIONS = (InitStudentOptions,)
CACHE_TEACHER_SECTIONS = (CacheTeacherOptions, TaskDataOptions, MaskingOptions, RunOptions)
PEEK_SECTIONS = (PeekOptions,)
ABLATE_SECTIONS = (AblateOptions, *PRETRAIN_SECTIONS)


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


def add_options(parser: argparse.ArgumentParser, *sections: type, profile: dict | None = None) -> None:
    """Add one flag per field of each dataclass in `sections` (`--max-seq-len`, `--no-progress`); each help line
    ends with the default, or the default that `profile` (the command's own settings) puts in its place."""
    for section in sections:
        group = parser.add_argument_group(section.__name__.removesuffix("Options").lower())
        hints = typing.get_type_hints(section)
        for f in dataclasses.fields(section):
            tp, nargs, is_bool = _flag_type(hints[f.name])
            name = "--" + f.name.replace("_", "-")
            help_ = _help(f.metadata.get("help", ""), _default(f, profile)).replace("%", "%%")
            if is_bool:
                group.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            else:
                choices = f.metadata.get("choices")
                metavar = None if choices else f.name.upper()
                group.add_argument(
                    name, dest=f.name, type=tp, nargs=nargs, default=None, help=help_, choices=choices, metavar=metavar
                )


def _default(f: dataclasses.Field, profile: dict | None):
    if profile and f.name in profile:
        return profile[f.name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _help(text: str, value) -> str:
    """The help line with its default; an empty default whose meaning the text already gives ("default: …") is
    not repeated as "none"."""
    if isinstance(value, list):
        value = " ".join(map(str, value))
    if value == "":
        return text if "default" in text else f"{text} (default: none)"
    return f"{text} (default: {value})"


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
        section_values = file_cfg.get(section.__name__.removesuffix("Options").lower())
        if isinstance(section_values, dict):  # `data` names a section and a field: a list or string is the field
            values.update(section_values)
        hints = typing.get_type_hints(section)
        kwargs = {}
        for f in dataclasses.fields(section):
            if getattr(args, f.name, None) is not None:
                kwargs[f.name] = getattr(args, f.name)
            elif f.name in values:
                kwargs[f.name] = _checked(f.name, values[f.name], hints[f.name], f.metadata.get("choices"))
        out.append(section(**kwargs))
    return out


def _checked(name: str, value, tp, choices):
    """A value from a config file or profile, checked against the field's type (ints stay whole: 2.5 steps is an
    error, not 2) and choices; a clear error names the option, the value and what it needs."""
    inner, nargs, is_bool = _flag_type(tp)
    flag = "--" + name.replace("_", "-")

    def one(v):
        if is_bool:
            ok = isinstance(v, bool)
        elif inner is int:
            ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
            v = int(v) if ok else v
        elif inner is float:
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            v = float(v) if ok else v
        else:
            ok = isinstance(v, inner)
        if not ok:
            need = "true or false" if is_bool else {int: "a whole number", float: "a number", str: "a string"}[inner]
            raise ValueError(f"config: {name} ({flag}) must be {need}, got {v!r}")
        if choices and v not in choices:
            raise ValueError(f"config: {name} ({flag}) must be one of {', '.join(map(str, choices))}, got {v!r}")
        return v

    if nargs:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"config: {name} ({flag}) must be a list, got {value!r}")
        return [one(v) for v in value]
    return one(value)


# Ranges of the numeric options that a wrong sign or size turns into silent nonsense (a negative alpha switches a term
# off, a zero temperature divides by zero); checked before a run touches its folder. Field name → (test, wording).
_RANGES = {
    "lr": (lambda v: v > 0, "> 0"),
    "eps": (lambda v: v > 0, "> 0"),
    "weight_decay": (lambda v: v >= 0, "≥ 0"),
    "warmup": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "clip": (lambda v: v >= 0, "≥ 0"),
    "grad_accum": (lambda v: v >= 1, "≥ 1"),
    "steps": (lambda v: v >= 1, "≥ 1"),
    "batch_size": (lambda v: v >= 1, "≥ 1"),
    "temperature": (lambda v: v > 0, "> 0"),
    "alpha_ce": (lambda v: v >= 0, "≥ 0"),
    "alpha_mlm": (lambda v: v >= 0, "≥ 0"),
    "alpha_cos": (lambda v: v >= 0, "≥ 0"),
    "alpha_qa": (lambda v: v >= 0, "≥ 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "mlm_probability": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "mask_replace": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "random_replace": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "mlm_smoothing": (lambda v: v >= 0, "≥ 0"),
    "heldout_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "validation_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "epochs": (lambda v: v >= 0, "≥ 0"),
    "log_every": (lambda v: v >= 1, "≥ 1"),
    "eval_every": (lambda v: v >= 0, "≥ 0"),
    "save_every": (lambda v: v >= 0, "≥ 0"),
    "eval_batches": (lambda v: v >= 0, "≥ 0"),
    "latency_iters": (lambda v: v >= 0, "≥ 0"),
    "top_k": (lambda v: v >= 1, "≥ 1"),
    "mask_copies": (lambda v: v >= 1, "≥ 1"),
    "shard_size": (lambda v: v >= 1, "≥ 1"),
}


def check_ranges(*options) -> None:
    """Refuse a numeric option outside its range (or not finite), naming the flag; see `_RANGES`."""
    for o in options:
        for f in dataclasses.fields(o):
            value = getattr(o, f.name)
            if f.name not in _RANGES or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            test, wording = _RANGES[f.name]
            if not (math.isfinite(value) and test(value)):
                raise ValueError(f"--{f.name.replace('_', '-')} must be {wording}, got {value}")


FSDP_COMMANDS = ("pretrain", "adapt-head")  # the commands whose runs --fsdp shards
# What a command that does not shard does under torchrun instead, where it is not DDP (its refusal of --fsdp says so).
_UNSHARDED = {"cache-teacher": "runs a whole teacher in every process, each writing its own shards of the cache"}


def check_fsdp(run: RunOptions, command: str, teacher_cache: str = "") -> None:
    """Refuse --fsdp where it is not built: a one-line error naming the conflict and the fix."""
    if not run.fsdp:
        return
    if command not in FSDP_COMMANDS:
        instead = _UNSHARDED.get(command, "replicates its models with DDP")
        raise ValueError(
            f"--fsdp: `distill {command}` does not shard (only {' and '.join(FSDP_COMMANDS)} do); under torchrun it "
            f"{instead}: drop --fsdp"
        )
    if teacher_cache:
        raise ValueError(
            "--fsdp with --teacher-cache: training from a cache does not shard (there is no teacher in memory, and "
            "the student is replicated); drop --fsdp"
        )
    if run.compile:
        raise ValueError("--fsdp with --compile: compiling FSDP2-sharded layers is not supported yet; drop one of them")


def to_dict(*options) -> dict:
    """Options as a JSON-able dict keyed by section name (what a run records and a resume checks)."""
    return {type(o).__name__.removesuffix("Options").lower(): dataclasses.asdict(o) for o in options}

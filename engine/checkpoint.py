"""Checkpoint I/O in the Hugging Face layout: config.json + model.safetensors (or sharded) + tokenizer files.

Weights move between the two namings through one explicit, total key map per architecture (torchtitan's
state-dict adapters): `FROM_HF[arch]` maps every Hugging Face key, written without the `bert.`/`distilbert.` prefix
and with `{}` for a layer index, to our parameter name (as in a head model: `encoder.…`, `lm_head.…`, ...) or to
None for keys we drop on purpose (the `position_ids` buffers, BERT's next-sentence head). `TO_HF` is its inverse.
A key in a file that the map does not know is an error, never silently skipped, and every shape is checked
(nanoGPT's `from_pretrained` asserts), so a checkpoint either loads exactly or fails with the keys named.

Heads: a checkpoint may hold any head (or none); `load_model` takes the one asked for, reports the keys of other
heads as unused, and initializes the asked head afresh (and says so) when the checkpoint lacks it. A tied MLM
decoder (`tie_word_embeddings`) is the word-embedding table and is neither needed in, nor written to, the file.

Saving goes through `atomic_directory`: everything is written to a hidden sibling, flushed to disk, and swapped in
with one rename, so a crash leaves either the old checkpoint or the new one, never a mixture.
"""

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.atomic import atomic_directory
from engine.config import ModelConfig
from engine.model import Encoder, build_model, head_of

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)

# ---- the key maps --------------------------------------------------------------------------------------------------

# Hugging Face name (prefix stripped; "{}" = layer index) → our name, or None for a key dropped on purpose.
FROM_HF: dict[str, dict[str, str | None]] = {
    "bert": {
        "embeddings.word_embeddings.weight": "encoder.embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "encoder.embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "encoder.embeddings.layer_norm.weight",
        "embeddings.LayerNorm.bias": "encoder.embeddings.layer_norm.bias",
        "embeddings.position_ids": None,  # a buffer of 0..P-1, saved by transformers < 4.31
        "embeddings.token_type_ids": None,  # a buffer of zeros
        "encoder.layer.{}.attention.self.query.weight": "encoder.layers.{}.attention.q_lin.weight",
        "encoder.layer.{}.attention.self.query.bias": "encoder.layers.{}.attention.q_lin.bias",
        "encoder.layer.{}.attention.self.key.weight": "encoder.layers.{}.attention.k_lin.weight",
        "encoder.layer.{}.attention.self.key.bias": "encoder.layers.{}.attention.k_lin.bias",
        "encoder.layer.{}.attention.self.value.weight": "encoder.layers.{}.attention.v_lin.weight",
        "encoder.layer.{}.attention.self.value.bias": "encoder.layers.{}.attention.v_lin.bias",
        "encoder.layer.{}.attention.output.dense.weight": "encoder.layers.{}.attention.out_lin.weight",
        "encoder.layer.{}.attention.output.dense.bias": "encoder.layers.{}.attention.out_lin.bias",
        "encoder.layer.{}.attention.output.LayerNorm.weight": "encoder.layers.{}.sa_layer_norm.weight",
        "encoder.layer.{}.attention.output.LayerNorm.bias": "encoder.layers.{}.sa_layer_norm.bias",
        "encoder.layer.{}.intermediate.dense.weight": "encoder.layers.{}.ffn.lin1.weight",
        "encoder.layer.{}.intermediate.dense.bias": "encoder.layers.{}.ffn.lin1.bias",
        "encoder.layer.{}.output.dense.weight": "encoder.layers.{}.ffn.lin2.weight",
        "encoder.layer.{}.output.dense.bias": "encoder.layers.{}.ffn.lin2.bias",
        "encoder.layer.{}.output.LayerNorm.weight": "encoder.layers.{}.output_layer_norm.weight",
        "encoder.layer.{}.output.LayerNorm.bias": "encoder.layers.{}.output_layer_norm.bias",
        # MLM head (BertForMaskedLM / BertForPreTraining)
        "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
        "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
        "cls.predictions.transform.LayerNorm.weight": "lm_head.layer_norm.weight",
        "cls.predictions.transform.LayerNorm.bias": "lm_head.layer_norm.bias",
        "cls.predictions.decoder.weight": "lm_head.decoder.weight",
        "cls.predictions.decoder.bias": "lm_head.decoder.bias",  # the bias the forward adds
        "cls.predictions.bias": "lm_head.decoder.bias",  # the same Parameter when tied; v5 saves only this one then
        "cls.seq_relationship.weight": None,  # next-sentence prediction head of BertForPreTraining
        "cls.seq_relationship.bias": None,
        # sequence classification (the pooler exists in BertModel too; it is used by this head only)
        "pooler.dense.weight": "pooler.weight",
        "pooler.dense.bias": "pooler.bias",
        "classifier.weight": "classifier.weight",
        "classifier.bias": "classifier.bias",
        # question answering
        "qa_outputs.weight": "qa_outputs.weight",
        "qa_outputs.bias": "qa_outputs.bias",
    },
    "distilbert": {
        "embeddings.word_embeddings.weight": "encoder.embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "encoder.embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight": "encoder.embeddings.layer_norm.weight",
        "embeddings.LayerNorm.bias": "encoder.embeddings.layer_norm.bias",
        "embeddings.position_ids": None,
        "transformer.layer.{}.attention.q_lin.weight": "encoder.layers.{}.attention.q_lin.weight",
        "transformer.layer.{}.attention.q_lin.bias": "encoder.layers.{}.attention.q_lin.bias",
        "transformer.layer.{}.attention.k_lin.weight": "encoder.layers.{}.attention.k_lin.weight",
        "transformer.layer.{}.attention.k_lin.bias": "encoder.layers.{}.attention.k_lin.bias",
        "transformer.layer.{}.attention.v_lin.weight": "encoder.layers.{}.attention.v_lin.weight",
        "transformer.layer.{}.attention.v_lin.bias": "encoder.layers.{}.attention.v_lin.bias",
        "transformer.layer.{}.attention.out_lin.weight": "encoder.layers.{}.attention.out_lin.weight",
        "transformer.layer.{}.attention.out_lin.bias": "encoder.layers.{}.attention.out_lin.bias",
        "transformer.layer.{}.sa_layer_norm.weight": "encoder.layers.{}.sa_layer_norm.weight",
        "transformer.layer.{}.sa_layer_norm.bias": "encoder.layers.{}.sa_layer_norm.bias",
        "transformer.layer.{}.ffn.lin1.weight": "encoder.layers.{}.ffn.lin1.weight",
        "transformer.layer.{}.ffn.lin1.bias": "encoder.layers.{}.ffn.lin1.bias",
        "transformer.layer.{}.ffn.lin2.weight": "encoder.layers.{}.ffn.lin2.weight",
        "transformer.layer.{}.ffn.lin2.bias": "encoder.layers.{}.ffn.lin2.bias",
        "transformer.layer.{}.output_layer_norm.weight": "encoder.layers.{}.output_layer_norm.weight",
        "transformer.layer.{}.output_layer_norm.bias": "encoder.layers.{}.output_layer_norm.bias",
        # MLM head (DistilBertForMaskedLM)
        "vocab_transform.weight": "lm_head.dense.weight",
        "vocab_transform.bias": "lm_head.dense.bias",
        "vocab_layer_norm.weight": "lm_head.layer_norm.weight",
        "vocab_layer_norm.bias": "lm_head.layer_norm.bias",
        "vocab_projector.weight": "lm_head.decoder.weight",
        "vocab_projector.bias": "lm_head.decoder.bias",
        # sequence classification
        "pre_classifier.weight": "pooler.weight",
        "pre_classifier.bias": "pooler.bias",
        "classifier.weight": "classifier.weight",
        "classifier.bias": "classifier.bias",
        # question answering
        "qa_outputs.weight": "qa_outputs.weight",
        "qa_outputs.bias": "qa_outputs.bias",
    },
}
# Our name → its Hugging Face keys; every one is written, the first is preferred when a file has several.
TO_HF: dict[str, dict[str, list[str]]] = {arch: {} for arch in FROM_HF}
for _arch, _map in FROM_HF.items():
    for _hf, _ours in _map.items():
        if _ours is not None:
            TO_HF[_arch].setdefault(_ours, []).append(_hf)
# Keys of the base model: written with the `bert.`/`distilbert.` prefix by head models. Heads are never prefixed.
BASE_PREFIXES = {"bert": ("embeddings.", "encoder.", "pooler."), "distilbert": ("embeddings.", "transformer.")}
# Which of our parameters belong to which head.
HEAD_PARAMS = {"mlm": ("lm_head.",), "classification": ("classifier.",), "qa": ("qa_outputs.",)}
# Parameter groups a checkpoint may lack as a whole, each then initialized afresh (as transformers does): the head
# asked for, and the pooler (BERT's belongs to the base model, yet BertForMaskedLM checkpoints have none; DistilBERT's
# pre_classifier belongs to its classification head). A group present only in part is a broken checkpoint.
OPTIONAL_GROUPS = ("pooler.",)
_LAYER = re.compile(r"\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the keys and the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory or its weights file does not exist."""


@dataclass
class LoadReport:
    """What `load_model` did besides loading every parameter of the model from the checkpoint."""

    files: list[Path] = field(default_factory=list)  # weight files read
    initialized: list[str] = field(default_factory=list)  # our parameters freshly initialized (head not in the file)
    unused: list[str] = field(default_factory=list)  # checkpoint keys of other heads, not loaded
    dropped: list[str] = field(default_factory=list)  # checkpoint keys dropped by design (buffers, NSP head, tied copy)
    tied: bool = False  # the MLM decoder is the word-embedding table


def hf_to_ours(key: str, arch: str, num_layers: int | None = None) -> str | None:
    """Our parameter name for a Hugging Face key (prefix stripped), None if dropped by design.

    Raises:
        KeyError: the key is not in the map (or names a layer ≥ num_layers).
    """
    m = _LAYER.search(key)
    template = key if m is None else key[: m.start()] + ".{}." + key[m.end() :]
    if template not in FROM_HF[arch]:
        raise KeyError(key)
    ours = FROM_HF[arch][template]
    if m is None or ours is None:
        return ours
    if num_layers is not None and int(m.group(1)) >= num_layers:
        raise KeyError(key)
    return ours.format(int(m.group(1)))


def ours_to_hf(name: str, arch: str, prefixed: bool) -> list[str]:
    """The Hugging Face keys of our parameter (named as in a head model), with the base-model prefix if `prefixed`.

    One key, except BERT's MLM bias, which transformers keeps under two names (cls.predictions.bias and the
    decoder's own bias: one Parameter when tied, two when not, of which the forward uses the decoder's).
    """
    m = _LAYER.search(name)
    template = name if m is None else name[: m.start()] + ".{}." + name[m.end() :]
    keys = TO_HF[arch][template]
    if m is not None:
        keys = [k.format(int(m.group(1))) for k in keys]
    return [f"{arch}.{k}" if prefixed and k.startswith(BASE_PREFIXES[arch]) else k for k in keys]


def _normalize_hf_key(key: str, arch: str) -> str:
    """Strip the base-model prefix (`bert.` / `distilbert.`) and rename legacy spellings."""
    key = key.removeprefix(arch + ".")
    if key.endswith(".gamma") or key.endswith(".beta"):  # TF-era LayerNorm names
        key = key.rsplit(".", 1)[0] + (".weight" if key.endswith(".gamma") else ".bias")
    return key


# ---- reading files -------------------------------------------------------------------------------------------------


def _check_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"Checkpoint directory {path} does not exist: check the path")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path} is a file, not a checkpoint directory (config.json + weights)")
    return path


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards its index names.

    Raises:
        CheckpointNotFoundError: no weights file (or a shard the index names is missing).
        CheckpointError: an unreadable index.
    """
    path = _check_dir(path)
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e!r}): restore it") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index} names shards missing from {path}: {missing}; copy them there")
        return [path / s for s in shards]
    others = [p.name for p in path.iterdir() if p.name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")]
    hint = (
        f" It holds {others}: convert it with transformers (`AutoModel.from_pretrained(dir).save_pretrained(dir)` "
        "writes model.safetensors)."
        if others
        else ""
    )
    raise CheckpointNotFoundError(f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {path}.{hint}")


def _corrupt(file: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{file} is not a readable safetensors file ({e}): it is corrupt or truncated (an interrupted download or "
        "copy?); download or save it again"
    )


def checkpoint_keys(path: str | Path) -> list[str]:
    """Every tensor name in a checkpoint's weight files (headers only: no tensor is read)."""
    keys = []
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                keys.extend(f.keys())
        except SafetensorError as e:
            raise _corrupt(file, e) from e
    return keys


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """All tensors of a checkpoint directory, on CPU in their stored dtype, keyed by their names in the file."""
    files = weight_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise _corrupt(file, e) from e
    return tensors, files


def has_mlm_head(path: str | Path) -> bool:
    """Whether the checkpoint in `path` holds an MLM head (BERT's cls.predictions, DistilBERT's vocab_*)."""
    config = ModelConfig.from_pretrained(_check_dir(path))
    names = {_normalize_hf_key(k, config.arch) for k in checkpoint_keys(path)}
    return ("cls.predictions.transform.dense.weight" if config.arch == "bert" else "vocab_transform.weight") in names


# ---- loading -------------------------------------------------------------------------------------------------------


def _our_state_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters under our canonical names (an Encoder's get the `encoder.` prefix)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    prefix = "encoder." if isinstance(model, Encoder) else ""
    return {prefix + k.replace("_orig_mod.", ""): v for k, v in model.state_dict(keep_vars=True).items()}


def _map_checkpoint(
    tensors: dict[str, torch.Tensor], config: ModelConfig, expected: dict[str, torch.Tensor], head: str | None
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Rename a file's tensors to our names and check them against the model's; raise with every problem named."""
    report = LoadReport(tied=config.tie_word_embeddings and head == "mlm")
    state, source, unexpected = {}, {}, []
    for key, tensor in tensors.items():
        name = _normalize_hf_key(key, config.arch)
        try:
            ours = hf_to_ours(name, config.arch, config.num_layers)
        except KeyError:
            unexpected.append(key)
            continue
        if ours is not None and ours in source:  # a second name for one parameter (BERT's MLM bias)
            keep, drop = (key, source[ours]) if name == TO_HF[config.arch][ours][0] else (source[ours], key)
            report.dropped.append(drop)
            state[ours], source[ours] = tensors[keep], keep
            continue
        if ours is None:
            report.dropped.append(key)
        elif ours == "lm_head.decoder.weight" and config.tie_word_embeddings:
            report.dropped.append(key)  # the decoder is the word-embedding table (as in transformers)
        elif ours not in expected:
            report.unused.append(key)  # a parameter of another head
        else:
            state[ours], source[ours] = tensor, key
    missing = [k for k in expected if k not in state and not (report.tied and k == "lm_head.decoder.weight")]
    # A group absent from the file as a whole is initialized afresh; a group half there is a broken checkpoint.
    groups = [HEAD_PARAMS[head]] if head is not None else []
    for prefixes in [*groups, OPTIONAL_GROUPS]:
        group = [k for k in expected if k.startswith(prefixes) and not (report.tied and k == "lm_head.decoder.weight")]
        if group and all(k in missing for k in group):
            report.initialized += group
            missing = [k for k in missing if k not in group]
    if config.sinusoidal_pos_embds and "encoder.embeddings.position_embeddings.weight" in missing:
        missing.remove("encoder.embeddings.position_embeddings.weight")  # a fixed table: computed, not learned
        report.initialized.append("encoder.embeddings.position_embeddings.weight")
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {[ours_to_hf(k, config.arch, False)[0] for k in missing]}")
    if unexpected:
        problems.append(
            f"unexpected keys (not part of a {config.arch} model with {config.num_layers} layers): {unexpected}"
        )
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise CheckpointError(
            "The checkpoint does not fit its config.json: " + ". ".join(problems) + ". Check that config.json "
            "belongs to these weights (model_type, sizes, num_labels), or re-save the checkpoint."
        )
    return state, report


def load_model(
    path: str | Path,
    head: str | None = "mlm",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    num_labels: int | None = None,
) -> tuple[torch.nn.Module, LoadReport]:
    """Load a Hugging Face BERT or DistilBERT checkpoint directory into our model.

    Args:
        path: directory with config.json and model.safetensors (or model.safetensors.index.json and its shards).
        head: "mlm" → MaskedLM, "classification" → SequenceClassifier, "qa" → QuestionAnswerer, None → Encoder.
            A head missing from the checkpoint is initialized afresh and listed in the report.
        dtype: parameter dtype (e.g. torch.bfloat16 for a frozen teacher); None: fp32 (master weights).
        device: where the parameters live.
        num_labels: classification only: the number of classes, when it differs from config.json (the
            checkpoint must then have no classifier, or loading fails with the shapes named).

    Returns:
        (model in eval mode, LoadReport).

    Raises:
        CheckpointNotFoundError: missing directory, config.json or weights file.
        CheckpointError: corrupt or truncated file, missing/unexpected keys, shape mismatches.
        UnsupportedModelError: config.json describes another architecture.
    """
    path = _check_dir(path)
    if not (path / "config.json").is_file():
        raise CheckpointNotFoundError(f"No config.json in {path}: a Hugging Face checkpoint directory holds one")
    config = ModelConfig.from_pretrained(path)
    if head == "classification" and num_labels is not None and num_labels != config.num_labels:
        config = config.replace(num_labels=num_labels, id2label=None, label2id=None)
    if head == "qa" and config.num_labels != 2:
        config = config.replace(num_labels=2, id2label=None, label2id=None)  # start and end logits
    tensors, files = read_tensors(path)
    # Built initialized (heads the file lacks keep this init, as in transformers), then overwritten from the file.
    with torch.device(device):
        model = build_model(config, head)
    model.to(dtype or torch.get_default_dtype())
    expected = _our_state_names(model)
    state, report = _map_checkpoint(tensors, config, expected, head)
    report.files = files
    _copy_into(expected, state)
    return model.eval(), report


@torch.no_grad()
def _copy_into(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model's parameters (converting dtype, moving device)."""
    for name, tensor in state.items():
        params[name].copy_(tensor)


def load_state_into(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Copy a checkpoint's weights into an existing model in place (resuming): every parameter must be there.

    The model keeps its dtype and device. Raises CheckpointError as `load_model` does, and also when the
    checkpoint lacks the model's head.
    """
    core = getattr(model, "_orig_mod", model)
    head = head_of(core)
    tensors, files = read_tensors(_check_dir(path))
    expected = _our_state_names(core)
    state, report = _map_checkpoint(tensors, core.config, expected, head)
    report.files = files
    if report.initialized:
        raise CheckpointError(
            f"{path} lacks the model's parameters {report.initialized}: it is not this model's checkpoint"
        )
    _copy_into(expected, state)
    return report


# ---- saving --------------------------------------------------------------------------------------------------------


def to_hf_state(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names, as `transformers` saves them (a tied decoder left out).

    `state`: the weights under our names, when the model's own are not whole (an FSDP2-sharded model's, gathered by
    `engine.distributed.DataParallel.full_state`); None: the model's.
    """
    core = getattr(model, "_orig_mod", model)
    head, config = head_of(core), core.config
    out = {}
    for name, tensor in (_our_state_names(core) if state is None else state).items():
        if name == "lm_head.decoder.weight" and config.tie_word_embeddings:
            continue
        for i, key in enumerate(ours_to_hf(name, config.arch, prefixed=head is not None)):
            out[key] = tensor.detach() if i == 0 else tensor.detach().clone()  # safetensors refuses shared storage
    return out


def save_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory, atomically.

    `out_dir` gets config.json (model_type and `architectures` for the model's head, e.g. DistilBertForMaskedLM),
    model.safetensors (the parameters in their current dtype) and, from `tokenizer_dir`, the tokenizer files
    present there (vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json, added_tokens.json).
    `transformers.AutoModelFor…from_pretrained(out_dir)` loads it with no missing keys. An existing `out_dir` is
    replaced. `state` (our names → whole tensors) stands in for the model's weights, as in `to_hf_state`.

    Returns:
        out_dir as a Path.
    """
    core = getattr(model, "_orig_mod", model)
    head, config = head_of(core), core.config
    tensors = {k: v.to("cpu").contiguous() for k, v in to_hf_state(core, state).items()}
    hf_config = config.to_hf_dict(head)
    dtype = (_our_state_names(core) if state is None else state)["encoder.embeddings.word_embeddings.weight"].dtype
    hf_config["dtype"] = str(dtype).removeprefix("torch.")
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
    return out_dir

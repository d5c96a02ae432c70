"""Student initialization from a teacher checkpoint, as the original DistilBERT does it
(`examples/research_projects/distillation/scripts/extract_distilbert.py` in transformers).

The student is a shallower copy of the teacher: the embeddings, a chosen subset of the teacher's layers (by
default [0, 2, 4, 7, 9, 11] of 12, the original choice) and the MLM head. Because our parameter names are the same
for BERT and DistilBERT (`engine/model.py`), the copy is a renumbering of layers in our namespace; the renaming to
DistilBERT's keys (attention.self.query → attention.q_lin, ..., cls.predictions.transform → vocab_transform,
decoder → vocab_projector) is the DistilBERT key map of `engine/checkpoint.py`, applied when the student is saved.

BERT → DistilBERT drops what DistilBERT has no place for: the pooler and the token-type embeddings. Dropping the
latter removes token_type_embeddings[0] from every token's embedding, so the student's first outputs differ from
the teacher's layers; the original DistilBERT accepts this (training repairs it). `fold_token_type=True` instead
adds token_type_embeddings[0] to the position table, so that on segment-0 inputs the student computes exactly what
the chosen teacher layers compute.
"""

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.checkpoint import has_mlm_head, load_model, save_model
from engine.config import DISTILBERT_LAYER_NORM_EPS, ModelConfig, UnsupportedModelError
from engine.model import build_model


def select_layers(
    teacher_layers: int, student_layers: int | None = None, layers: Sequence[int] | None = None
) -> list[int]:
    """Which teacher layers seed the student's, in order.

    Default: `student_layers` indices spread evenly over the teacher, first and last included:
    round(i·(T−1)/(S−1)) for i = 0..S−1 (halves rounded up), which for 12 → 6 is DistilBERT's [0, 2, 4, 7, 9, 11];
    a 1-layer student takes layer 0.

    Args:
        teacher_layers: T, the teacher's depth.
        student_layers: S, the student's depth (None: len(layers) if given, else T // 2).
        layers: an explicit choice, validated: strictly increasing indices in [0, T), S of them.

    Returns:
        list of S teacher layer indices.

    Raises:
        ValueError: an index out of range, an unordered or repeated choice, or S not in [1, T].
    """
    if layers is not None:
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < teacher_layers]
        if bad:
            raise ValueError(
                f"layer indices {bad} are out of range: the teacher has {teacher_layers} layers "
                f"(0..{teacher_layers - 1})"
            )
        if not layers:
            raise ValueError("layers is empty: choose at least one teacher layer")
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers {layers} must be strictly increasing (teacher order, no repeats)")
        if student_layers is not None and student_layers != len(layers):
            raise ValueError(f"{len(layers)} layers chosen ({layers}) for a student of {student_layers} layers")
        return layers
    S = teacher_layers // 2 if student_layers is None else int(student_layers)
    if not 1 <= S <= teacher_layers:
        raise ValueError(f"a student of {S} layers cannot be taken from a teacher of {teacher_layers} layers (1..T)")
    if S == 1:
        return [0]
    return [int(i * (teacher_layers - 1) / (S - 1) + 0.5) for i in range(S)]


def student_config(teacher: ModelConfig, num_layers: int, arch: str = "distilbert") -> ModelConfig:
    """The student's config: the teacher's sizes with `num_layers` layers, as a `arch` ("distilbert" | "bert") model.

    Raises:
        UnsupportedModelError: a DistilBERT teacher for a BERT student (DistilBERT has no token-type embeddings).
    """
    if arch not in ("distilbert", "bert"):
        raise ValueError(f"arch must be 'distilbert' or 'bert', got {arch!r}")
    if arch == teacher.arch:
        return teacher.replace(num_layers=num_layers)
    if arch == "bert":
        raise UnsupportedModelError("A DistilBERT teacher can only seed a DistilBERT student (it has no token types)")
    if teacher.layer_norm_eps != DISTILBERT_LAYER_NORM_EPS:
        warnings.warn(
            f"the teacher's LayerNorm epsilon is {teacher.layer_norm_eps}; a DistilBERT student has "
            f"{DISTILBERT_LAYER_NORM_EPS} (fixed by transformers), so its initial outputs differ slightly. "
            "Use arch='bert' to keep it.",
            stacklevel=2,
        )
    return teacher.replace(
        arch="distilbert",
        num_layers=num_layers,
        type_vocab_size=0,
        layer_norm_eps=DISTILBERT_LAYER_NORM_EPS,
        sinusoidal_pos_embds=False,
        classifier_dropout=0.2 if teacher.classifier_dropout is None else teacher.classifier_dropout,
        qa_dropout=0.1,  # DistilBertConfig's default
    )


def build_student_state(
    teacher_state: dict[str, torch.Tensor],
    layers: Sequence[int],
    arch: str = "distilbert",
    fold_token_type: bool = False,
) -> dict[str, torch.Tensor]:
    """The student's parameters from the teacher's, both under our names (`engine/model.py`, as in MaskedLM).

    Student layer j is teacher layer layers[j]; embeddings and the MLM head (`lm_head.*`, when present) are copied;
    the pooler and other heads are dropped. For a DistilBERT student the token-type table is dropped, or, with
    `fold_token_type`, its row 0 is added to the position table. Pure: tensors are shared, not copied.

    Args:
        teacher_state: name → tensor, e.g. `MaskedLM.state_dict()` of the teacher.
        layers: teacher layer index for each student layer.
        arch: "distilbert" or "bert", the student's architecture.
        fold_token_type: see above (DistilBERT students only).

    Returns:
        name → tensor for the student (shapes as in the teacher; dtypes unchanged).
    """
    out = {}
    for name, tensor in teacher_state.items():
        if name.startswith("encoder.layers."):
            continue
        if name.startswith("encoder.embeddings.token_type_embeddings") and arch == "distilbert":
            continue
        if name.startswith(("encoder.", "lm_head.")):
            out[name] = tensor
    for j, i in enumerate(layers):
        prefix = f"encoder.layers.{i}."
        for name, tensor in teacher_state.items():
            if name.startswith(prefix):
                out[f"encoder.layers.{j}." + name[len(prefix) :]] = tensor
    token_types = teacher_state.get("encoder.embeddings.token_type_embeddings.weight")
    if arch == "distilbert" and fold_token_type and token_types is not None:
        # word + type[0] + pos[p] = word + (pos[p] + type[0]): the same embedding sum for segment-0 inputs.
        out["encoder.embeddings.position_embeddings.weight"] = (
            teacher_state["encoder.embeddings.position_embeddings.weight"] + token_types[0]
        )
    return out


def init_student(
    teacher_dir: str | Path,
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    arch: str = "distilbert",
    fold_token_type: bool = False,
) -> Path:
    """Write a student checkpoint initialized from a teacher checkpoint's embeddings, layers and MLM head.

    Args:
        teacher_dir: Hugging Face BERT or DistilBERT checkpoint directory (with or without an MLM head; without
            one, the student has none either).
        out_dir: where the student goes (config.json, model.safetensors and the teacher's tokenizer files),
            written atomically; an existing directory is replaced.
        layers: teacher layers to copy (default: `select_layers`' even spread).
        num_layers: student depth (default: len(layers), else half the teacher's).
        arch: "distilbert" (the default, as the original DistilBERT) or "bert" (a shallower BERT).
        fold_token_type: DistilBERT students: fold token_type_embeddings[0] into the position table (see the
            module docstring) instead of dropping it as the original does.

    Returns:
        out_dir as a Path.
    """
    if Path(out_dir).resolve() == Path(teacher_dir).resolve():
        raise ValueError(f"out_dir {out_dir} is the teacher's directory: the student would replace the teacher")
    teacher_cfg = ModelConfig.from_pretrained(teacher_dir)
    chosen = select_layers(teacher_cfg.num_layers, num_layers, layers)
    cfg = student_config(teacher_cfg, len(chosen), arch)
    head = "mlm" if has_mlm_head(teacher_dir) else None
    teacher, _ = load_model(teacher_dir, head=head)
    teacher_state = teacher.state_dict()
    if head is None:  # an Encoder's names lack the `encoder.` prefix of our canonical names
        teacher_state = {"encoder." + k: v for k, v in teacher_state.items()}
    state = build_student_state(teacher_state, chosen, arch, fold_token_type)
    student = build_model(cfg, head)
    if head is None:
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
    student.load_state_dict(state, strict=True)  # tied decoder: the same table copied twice into one Parameter
    return save_model(student, out_dir, tokenizer_dir=teacher_dir)

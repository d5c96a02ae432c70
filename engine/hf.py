"""Hugging Face integration: distill with the `transformers.Trainer` (or any loop) on our objectives and kernels.

    DistillationTrainingArguments(TrainingArguments)   + alpha, temperature, alpha_ce, alpha_qa, alpha_mlm, alpha_cos
    DistillationTrainer(Trainer)                       teacher_model=...; compute_loss is a DistillationLoss
    DistillationLoss(teacher, task=...)                an nn.Module for any loop: (student, batch) → (loss, terms)

The losses are `engine.objectives`' (this module holds no loss math: it maps Hugging Face models, outputs and batches
onto those functions), and their defaults equal the recipes they replace:

    classification  α·CE + (1 − α)·T²·KL(batchmean)                         α 0.5, T 2
                    (the NLP with Transformers book's DistillationTrainer)
    qa              α_qa·½(CE_start + CE_end) + α_ce·½(KD_start + KD_end)   α_qa 0.5, α_ce 0.5, T 2
                    ((DistilBERT)²'s SQuAD distiller; its `alpha_squad` is α_qa)
    mlm             α_ce·T²·KL + α_mlm·MLM + α_cos·(1 − cos)                α_ce 5, α_mlm 2, α_cos 1, T 2
                    (DistilBERT's triple loss)

The task follows from the models' classes (`AutoModelFor{SequenceClassification, QuestionAnswering, MaskedLM}`);
classification and QA take any family, MLM takes BERT and DistilBERT (their heads are read directly). Differences
from the originals, both from `engine.objectives`: QA excludes pad positions from both terms (the original's HF span
loss and KD let pad positions hold probability), so the two agree exactly on unpadded batches; start/end positions
at or past the sequence length are ignored, as HF's QA heads ignore them.

MLM rows: the KD and cosine terms take every non-pad position (`attention_mask`), the MLM term the positions whose
label is not −100 (the batch's `labels`, e.g. from `DataCollatorForLanguageModeling`); with `restrict_ce_to_mask`
the KD term takes the labelled positions only. The HF MLM head never runs on all positions: its transform runs on
the selected rows and its decoder weight and bias feed the LM-head-fused kernel, so no [tokens × vocabulary] logits
exist. Finding the non-pad rows reads their count back to the host once per step.

Teacher: kept in eval mode and run under `no_grad`; before each use it is moved to the device and floating dtype
of the student's parameters (a no-op after the first step). A teacher that cannot be moved as a whole, because its
weights are split over several devices (`device_map`) or are still on the meta device, is a clear error, as are a
teacher of another task, another label space (num_labels, or id2label when both name their labels) or another
vocabulary. It is held outside the module tree, so `.parameters()` and `state_dict()` of a model that holds a
DistillationLoss stay the student's.

Trainer contract (`compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)`): the losses are
per-micro-batch means, like the recipes', so the trainer reports them as not scaled for gradient accumulation
(`loss_is_scaled_for_ga = False`: the Trainer divides by the accumulation steps) and sets `model_accepts_loss_kwargs`
to False so that the Trainer counts no `num_items_in_batch`; one passed anyway is accepted and ignored. The
unweighted terms (`kd`, `ce`; MLM: `kd`, `mlm`, `cos`) are summed on the device as detached tensors and written
beside `loss` at each logging step as their mean over the micro-batches since the last one (averaged over
processes by the accelerator), and as `eval_kd`, … in evaluation metrics.

DDP: the student is always called through its wrapper (DDP synchronizes gradients only then). For MLM its head
weights are used after the forward, so DDP must run with find_unused_parameters=False: the trainer sets
`ddp_find_unused_parameters=False` when it is unset (the Trainer's default would be True) and refuses True.
"""

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.auto import modeling_auto

from engine.objectives import (
    check_cosine_widths,
    check_kd_options,
    check_objective_options,
    pretrain_loss,
    task_loss,
)
from engine.options import KDOptions, ObjectiveOptions

TASKS = ("classification", "qa", "mlm")
# The weight options each task takes (None: the engine's default for that task).
TASK_OPTIONS = {
    "classification": ("alpha", "temperature"),
    "qa": ("alpha_ce", "alpha_qa", "temperature"),
    "mlm": ("alpha_ce", "alpha_mlm", "alpha_cos", "temperature", "restrict_ce_to_mask", "fused_head"),
}
_AUTO_MAPPINGS = {
    "classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "qa": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "mlm": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
}
# Class name → task, for every class the three Auto mappings name (an entry may name several classes).
_TASK_OF_CLASS = {
    name: task
    for task, mapping in _AUTO_MAPPINGS.items()
    for v in mapping.values()
    for name in ((v,) if isinstance(v, str) else v)
}
_AUTO_NAMES = {"classification": "SequenceClassification", "qa": "QuestionAnswering", "mlm": "MaskedLM"}
_TASK_WORDS = {"classification": "sequence-classification", "qa": "question-answering", "mlm": "masked-LM"}
_LABEL_KEYS = ("labels", "start_positions", "end_positions")


# ---- models: task, unwrapping, inputs, MLM heads ------------------------------------------------------------------


def task_of(model: nn.Module) -> str | None:
    """The task of a model (or subclass) of the `AutoModelFor…` classes: "classification", "qa" or "mlm"; else None."""
    return next((_TASK_OF_CLASS[c.__name__] for c in type(unwrap(model)).__mro__ if c.__name__ in _TASK_OF_CLASS), None)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP/DataParallel/FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch entries `model.forward` names, labels left out (the loss is ours, so HF computes none)."""
    params = inspect.signature(model.forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return {k: v for k, v in batch.items() if k in named and k not in _LABEL_KEYS}


@dataclass
class _Decoder:
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)


@dataclass
class _MLMHead:
    """An HF MLM head as `triple_loss` reads it: `transform(h)` (dense → activation → LayerNorm) and the vocabulary
    projection `decoder`."""

    transform: Callable[[torch.Tensor], torch.Tensor]
    decoder: _Decoder


def _mlm_head(model: nn.Module, frozen: bool = False) -> _MLMHead:
    """BertForMaskedLM: `cls.predictions.{transform, decoder}`; DistilBertForMaskedLM: `vocab_transform` →
    `activation` → `vocab_layer_norm`, then `vocab_projector`. `frozen` (the teacher): the decoder detached, since
    the kernels take the teacher's weights as constants whatever their `requires_grad`."""
    if _mlm_family(model) == "bert":
        transform, decoder = model.cls.predictions.transform, model.cls.predictions.decoder
    else:
        transform = lambda h: model.vocab_layer_norm(model.activation(model.vocab_transform(h)))  # noqa: E731
        decoder = model.vocab_projector
    weight, bias = decoder.weight, decoder.bias
    if frozen:
        weight, bias = weight.detach(), (bias.detach() if bias is not None else None)
    return _MLMHead(transform, _Decoder(weight, bias))


# The head submodules of each MLM family, set aside while the model computes its last hidden states.
_MLM_HEAD_MODULES = {
    "bert": ("cls",),
    "distilbert": ("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
}


def _mlm_family(model: nn.Module) -> str | None:
    if hasattr(model, "cls") and hasattr(model.cls, "predictions"):
        return "bert"
    if all(hasattr(model, n) for n in _MLM_HEAD_MODULES["distilbert"]):
        return "distilbert"
    return None


_IDENTITY = nn.Identity()  # one instance, so that a compiled forward sees the same module at every call


@contextlib.contextmanager
def _head_set_aside(hf: nn.Module):
    """Within the block, `hf`'s MLM head is the identity, so its forward returns the last hidden states as `logits`.

    Why: HF's MLM forward always projects every position onto the vocabulary, and the student must still be called
    through whatever wraps it, since DDP synchronizes gradients only when its wrapper's forward runs (calling
    `model.bert` directly would train each process on its own gradients). The head modules are restored on exit.
    """
    names = _MLM_HEAD_MODULES[_mlm_family(hf)]
    saved = {n: getattr(hf, n) for n in names}
    try:
        for n in names:
            setattr(hf, n, _IDENTITY)
        yield
    finally:
        for n, m in saved.items():
            setattr(hf, n, m)


def _last_hidden_state(model: nn.Module, hf: nn.Module, batch: dict) -> torch.Tensor:
    """(B, L, H) last hidden states of `model` (the callable, possibly wrapped; `hf` the HF model inside)."""
    with _head_set_aside(hf):
        return model(**_model_inputs(hf, batch)).logits


# ---- checks -------------------------------------------------------------------------------------------------------


def _named_labels(config) -> dict[int, str] | None:
    """id2label as {int: str}, or None when the labels are the generic LABEL_i."""
    id2label = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
    return None if all(v == f"LABEL_{k}" for k, v in id2label.items()) else id2label


def check_pair(student: nn.Module, teacher: nn.Module, task: str, opts=None) -> None:
    """Raise a ValueError naming the difference when `teacher` cannot teach `student` the task."""
    s, t = student.config, teacher.config
    names = f"student {type(student).__name__}, teacher {type(teacher).__name__}"
    for who, model in (("student", student), ("teacher", teacher)):
        if task_of(model) != task:
            raise ValueError(
                f"the {who} {type(model).__name__} is not a {_TASK_WORDS[task]} model ({names}); both must be "
                f"AutoModelFor{_AUTO_NAMES[task]} models"
            )
    sv, tv = getattr(s, "vocab_size", None), getattr(t, "vocab_size", None)
    if sv is not None and tv is not None and sv != tv:
        raise ValueError(
            f"vocabulary mismatch: the teacher has {tv} tokens and the student {sv} ({names}); both read the same "
            "input_ids, so the student must use the teacher's tokenizer"
        )
    if task == "classification":
        if s.num_labels != t.num_labels:
            raise ValueError(
                f"label-space mismatch: the teacher has {t.num_labels} labels and the student {s.num_labels}; "
                "build the student with the teacher's num_labels, id2label and label2id"
            )
        for who, c in (("student", s), ("teacher", t)):
            if c.num_labels < 2 or c.problem_type in ("regression", "multi_label_classification"):
                raise ValueError(
                    f"the {who} is set up for {c.problem_type or 'regression'} (num_labels {c.num_labels}); "
                    "distillation takes single-label classification (num_labels ≥ 2)"
                )
        sl, tl = _named_labels(s), _named_labels(t)
        if sl is not None and tl is not None and sl != tl:
            raise ValueError(
                f"label-space mismatch: the teacher's id2label {tl} differs from the student's {sl}; "
                "give the student the teacher's id2label and label2id, in the same order"
            )
    if task == "mlm":
        for who, model in (("student", student), ("teacher", teacher)):
            if _mlm_family(model) is None:
                raise ValueError(
                    f"the {who} {type(model).__name__} has an MLM head this integration cannot read; MLM "
                    "distillation takes BertForMaskedLM and DistilBertForMaskedLM"
                )
        if opts is not None:
            check_cosine_widths(_hidden_size(s), _hidden_size(t), opts, cli=False)


def _hidden_size(config) -> int:
    return getattr(config, "hidden_size", None) or config.dim


def _home(model: nn.Module, who: str) -> tuple[torch.device, torch.dtype | None]:
    """The one device of `model`'s parameters and buffers and its floating dtype; a ValueError when there is none."""
    tensors = list(model.parameters()) + list(model.buffers())
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise ValueError(
            f"the {who} is split over devices {sorted(map(str, devices))} (e.g. device_map='auto'); the teacher is "
            "run on the student's device, so load each model whole onto one device"
        )
    if any(d.type == "meta" for d in devices):
        raise ValueError(
            f"the {who} has its weights on the meta device (not loaded); load it fully (e.g. from_pretrained without "
            "device_map or meta initialization) before distilling"
        )
    floats = [x.dtype for x in model.parameters() if x.is_floating_point()]
    return devices.pop() if devices else torch.device("cpu"), (floats[0] if floats else None)


# ---- the loss -----------------------------------------------------------------------------------------------------


class DistillationLoss(nn.Module):
    """The distillation loss of one batch for any training loop, with a frozen Hugging Face teacher.

    Args:
        teacher: an HF `AutoModelForSequenceClassification`, `…QuestionAnswering` or `…MaskedLM` (BERT or
            DistilBERT) model; put in eval mode, moved to the student's device and dtype on use.
        task: "classification", "qa" or "mlm"; None: the teacher's.
        alpha: classification: weight of the label CE; the KD term gets 1 − alpha (default 0.5).
        temperature: T of every KD term (default 2.0).
        alpha_ce: weight of the KD term: QA (default 0.5), MLM (default 5.0).
        alpha_qa: QA: weight of the span CE (default 0.5; `alpha_squad` in (DistilBERT)²).
        alpha_mlm, alpha_cos: MLM: weights of the MLM CE (default 2.0) and of the cosine loss on last hidden states
            (default 1.0).
        restrict_ce_to_mask: MLM: KD on the labelled (masked) positions only (default: all non-pad positions).
        fused_head: MLM: the LM-head-fused kernel (default); False projects onto the vocabulary first.
        Options left None take `engine.options`' defaults (KDOptions, ObjectiveOptions); an option of another task
        is an error.

    Call: `loss, terms = loss_fn(student, batch)`, where `student` is the HF model being trained (or its DDP /
    compile wrapper) and `batch` a dict of (B, L) tensors on the student's device: input_ids, attention_mask (and
    whatever else the models take, e.g. token_type_ids) and the targets: "labels" (B,) int64 (classification),
    "start_positions"/"end_positions" (B,) int64 (qa), "labels" (B, L) int64, −100 where unmasked (mlm).
    Returns () fp32 loss and {"kd", "ce"} (MLM: {"kd", "mlm", "cos"}): () fp32 unweighted terms, detached.
    `compute(student, batch)` also returns the student's outputs.
    """

    def __init__(self, teacher: nn.Module, task: str | None = None, **options):
        super().__init__()
        task = task or task_of(teacher)
        if task not in TASKS:
            raise ValueError(
                f"task must be one of {', '.join(TASKS)}; got {task!r} (pass task= when the teacher's class "
                f"{type(teacher).__name__} does not tell)"
            )
        other = sorted(k for k, v in options.items() if v is not None and k not in TASK_OPTIONS[task])
        if other:
            raise ValueError(f"option(s) {other} do not apply to task {task!r}; it takes {list(TASK_OPTIONS[task])}")
        given = {k: v for k, v in options.items() if v is not None}
        self.task = task
        if task == "mlm":
            self.options = ObjectiveOptions(**given)
            check_objective_options(self.options, cli=False)
        else:
            self.options = KDOptions(**given)
            check_kd_options(task, self.options)
        _home(teacher, "teacher")
        # A plain attribute, not a submodule: the teacher stays out of parameters(), state_dict() and .train().
        self.__dict__["teacher"] = teacher.eval()
        self._checked: set[int] = set()

    @property
    def head_outside_forward(self) -> bool:
        """MLM with a KD or MLM term: the student's head weights are used outside its forward, so DDP must run with
        find_unused_parameters=False (with True it marks them unused during the forward and then fails when their
        gradients arrive: "Expected to mark a variable ready only once")."""
        return self.task == "mlm" and (self.options.kd_weight > 0 or self.options.alpha_mlm > 0)

    def extra_repr(self) -> str:
        return f"task={self.task!r}, {self.options}"

    def check(self, student: nn.Module) -> None:
        """The label-space / vocabulary / placement checks, once per student; then the teacher's placement."""
        hf = unwrap(student)
        if id(hf) not in self._checked:
            check_pair(hf, self.teacher, self.task, self.options)
            self._checked.add(id(hf))
        device, dtype = _home(hf, "student")
        t_device, t_dtype = _home(self.teacher, "teacher")
        if t_device != device or (dtype is not None and t_dtype != dtype):
            self.teacher.to(device=device, dtype=dtype)
        if self.teacher.training:
            self.teacher.eval()

    def forward(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms, _ = self.compute(student, batch)
        return loss, terms

    def compute(self, student: nn.Module, batch: dict):
        """(loss, terms, the student's outputs); for MLM the outputs hold the loss alone (no logits are formed)."""
        self.check(student)
        hf = unwrap(student)
        if self.task == "mlm":
            return self._mlm(student, hf, batch)
        s = student(**_model_inputs(hf, batch))
        with torch.no_grad():
            t = self.teacher(**_model_inputs(self.teacher, batch))
        if self.task == "classification":
            if "labels" not in batch:
                raise ValueError("classification distillation needs the batch's 'labels' (B,) class ids")
            targets = {"labels": batch["labels"]}
        else:
            targets = self._qa_targets(batch)
        loss, terms = task_loss(self.task, s, t, targets, self.options)
        return loss, terms, s

    @staticmethod
    def _qa_targets(batch: dict) -> dict:
        """Start/end positions (positions ≥ L ignored, as HF's QA heads do) and the pad mask of the batch."""
        missing = [k for k in ("start_positions", "end_positions") if k not in batch]
        if missing:
            raise ValueError(f"QA distillation needs the batch's {missing} (B,) token positions")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        length = ids.shape[1]
        out = {k: batch[k].masked_fill(batch[k] >= length, -100) for k in ("start_positions", "end_positions")}
        return {**out, "attention_mask": mask}

    def _mlm(self, student: nn.Module, hf: nn.Module, batch: dict):
        if "labels" not in batch:
            raise ValueError(
                "MLM distillation needs the batch's 'labels' (B, L): the original ids at masked positions, −100 "
                "elsewhere (DataCollatorForLanguageModeling makes them)"
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) non-pad positions; reads N back to the host
        loss, terms = pretrain_loss(
            lambda: _last_hidden_state(student, hf, batch),  # (B, L, H)
            lambda: _last_hidden_state(self.teacher, self.teacher, batch),  # (B, L, H_t)
            rows, batch["labels"], _mlm_head(hf), _mlm_head(self.teacher, frozen=True), self.options,
        )  # fmt: skip
        return loss, terms, MaskedLMOutput(loss=loss)


# ---- the Trainer --------------------------------------------------------------------------------------------------


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """TrainingArguments with the distillation weights (`DistillationLoss` describes each; None: the task's default)."""

    alpha: float = field(default=KDOptions.alpha, metadata=_help("classification: weight of the label CE (KD: 1 − α)"))
    temperature: float = field(default=KDOptions.temperature, metadata=_help("softmax temperature T of the KD term"))
    alpha_ce: float | None = field(default=None, metadata=_help("qa/mlm: weight of the KD term (0.5 qa, 5.0 mlm)"))
    alpha_qa: float | None = field(default=None, metadata=_help("qa: weight of the span CE (default 0.5)"))
    alpha_mlm: float | None = field(default=None, metadata=_help("mlm: weight of the MLM CE (default 2.0)"))
    alpha_cos: float | None = field(default=None, metadata=_help("mlm: weight of the hidden-state cosine (1.0)"))
    restrict_ce_to_mask: bool | None = field(default=None, metadata=_help("mlm: KD on masked positions only"))
    fused_head: bool | None = field(default=None, metadata=_help("mlm: LM-head-fused loss (default True)"))


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` that trains `model` (the student) against `teacher_model` with `DistillationLoss`.

    Args: the Trainer's, plus
        teacher_model: the frozen teacher (same task, label space and vocabulary as the student).
        task: "classification", "qa" or "mlm"; None: the student's (with `model_init`: the teacher's).
    The weights come from `args` (DistillationTrainingArguments; plain TrainingArguments give the defaults). For MLM,
    `args.ddp_find_unused_parameters` is set to False when unset (module docstring: DDP).
    `self.teacher` is the teacher (as in the book's trainer); `self.distillation_loss` the loss module.
    """

    loss_is_scaled_for_ga = False  # per-micro-batch means: the Trainer divides them by the accumulation steps

    def __init__(self, model=None, args=None, *rest, teacher_model: nn.Module | None = None, task=None, **kwargs):
        if teacher_model is None:
            raise TypeError("DistillationTrainer needs teacher_model=")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("DistillationTrainer computes the distillation loss itself; drop compute_loss_func")
        args = DistillationTrainingArguments(output_dir="tmp_trainer") if args is None else args
        task = task or (task_of(model) if model is not None else None) or task_of(teacher_model)
        options = {k: getattr(args, k, None) for k in TASK_OPTIONS.get(task, ())}
        self.distillation_loss = DistillationLoss(teacher_model, task=task, **options)
        if self.distillation_loss.head_outside_forward:  # set before the Trainer builds its accelerator
            if args.ddp_find_unused_parameters:
                raise ValueError(
                    "MLM distillation uses the student's head weights outside its forward, which DDP's "
                    "find_unused_parameters=True cannot take; leave ddp_find_unused_parameters unset or False"
                )
            args.ddp_find_unused_parameters = False
        super().__init__(model, args, *rest, **kwargs)
        # No num_items_in_batch: the losses are means (module docstring), so the Trainer must not count label tokens.
        self.model_accepts_loss_kwargs = False
        self._terms: dict[bool, tuple[dict[str, torch.Tensor], int]] = {}  # training? → (sums, micro-batches)
        if self.model is not None:
            self.distillation_loss.check(self.model)  # fail fast; the teacher moves to the student now

    @property
    def teacher(self) -> nn.Module:
        return self.distillation_loss.teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch (mean; `num_items_in_batch` is ignored: module docstring)."""
        loss, terms, outputs = self.distillation_loss.compute(model, inputs)
        sums, n = self._terms.get(model.training, ({}, 0))
        self._terms[model.training] = ({k: sums.get(k, 0) + v for k, v in terms.items()}, n + 1)
        return (loss, outputs) if return_outputs else loss

    def _mean_terms(self, training: bool, prefix: str = "") -> dict[str, float]:
        """The terms' means since the last call, averaged over processes (every process calls this)."""
        sums, n = self._terms.pop(training, ({}, 0))
        if not n:
            return {}
        keys = sorted(sums)
        means = self.accelerator.reduce(torch.stack([sums[k] for k in keys]) / n, reduction="mean")
        return {prefix + k: v for k, v in zip(keys, means.tolist())}

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log line
            logs = {**logs, **self._mean_terms(True)}
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        self._terms.pop(False, None)
        output = super().evaluation_loop(*args, **kwargs)
        bound = inspect.signature(super().evaluation_loop).bind(*args, **kwargs)
        prefix = bound.arguments.get("metric_key_prefix", "eval")
        output.metrics.update(self._mean_terms(False, prefix + "_"))
        return output


__all__ = [
    "DistillationLoss",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "check_pair",
    "task_of",
    "unwrap",
]

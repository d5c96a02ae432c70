"""`distill finetune` and `distill task`: task-specific fine-tuning and distillation (classification, extractive QA).

Both commands run on the shared loop (`engine.loop.train`: checkpoints, resume, logging, mixed precision) with a
task head instead of the MLM head:

    finetune      L = CE(s, y)                                        (plain fine-tuning; this makes teachers)
    task          classification: L = α·CE(s, y) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))
                  QA: L = α_qa·½(CE_start + CE_end) + α_ce·½(KD_start + KD_end), pad positions excluded

The teacher is a fine-tuned checkpoint with the task's head (and, for classification, the data's label set); it is
frozen, in eval mode, run under no_grad. KD compares logits only, so the student may differ from the teacher in
depth and width: a DistilBERT made from teacher layers, any smaller BERT, or a narrower model.

Setup order of `distill task`: output-folder guard → teacher (head and labels checked) → data (label names mapped
to the teacher's ids; validation given or split off deterministically) → student → distillation → the same student
fine-tuned without a teacher (the baseline) → evaluation of all three → latency and throughput → report.
With no arguments, `distill task` runs that whole story on the bundled assets (BBC News, MiniLM teacher).
"""

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine import defaults
from engine.config import ModelConfig
from engine.data import load_tokenizer
from engine.loop import autocast, compute_dtype, resolve_device, resolve_precision, train
from engine.metrics import accuracy, macro_f1, squad_evaluate
from engine.model import build_model, count_parameters
from engine.objectives import classification_kd_loss, qa_kd_loss
from engine.options import OptimOptions, RunOptions, add_options, build_options, opt, to_dict
from engine.qa import QAExample, QAFeatures, load_squad, postprocess, prepare_features, qa_batches
from engine.report import format_table, plot_curves, prepare_out_dir, read_history, write_json
from engine.tasks import (
    ClassificationData,
    classification_batches,
    encode_classification,
    load_classification,
    pad_to_multiple,
    train_validation_split,
)
from kernels import cross_entropy

TASKS = ("classification", "qa")
HEAD_KEY = {"classification": "classifier.weight", "qa": "qa_outputs.weight"}  # a checkpoint key ending that marks it
MAIN_METRIC = {"classification": "accuracy", "qa": "f1"}
DEFAULT_SEQ_LEN = {"classification": 128, "qa": 384}


# ---- options -------------------------------------------------------------------------------------------------------


@dataclass
class FinetuneOptions:
    task: str = opt("classification", "classification or qa")
    model: str = opt("", "checkpoint to fine-tune (Hugging Face BERT/DistilBERT folder); default: the bundled MiniLM")
    latency_iters: int = opt(10, "batch-1 forward passes timed for the latency figure (0: no speed figures)")


@dataclass
class TaskOptions:
    task: str = opt("classification", "classification or qa")
    teacher: str = opt("", "fine-tuned teacher checkpoint with the task's head (make one with `distill finetune`)")
    student: str = opt("", "student checkpoint (default: initialized from --student-from's layers)")
    student_from: str = opt(
        "", "checkpoint a student is initialized from when --student is not given (default: teacher)"
    )
    student_arch: str = opt("distilbert", "architecture of an initialized student: distilbert or bert")
    student_num_layers: int = opt(0, "depth of an initialized student (default: half of --student-from's)")
    baseline: bool = opt(True, "also fine-tune the same student without a teacher, for the report")
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
    batch_size: int = opt(32, "sequences (QA: windows) per micro-batch, in training and evaluation")
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


FINETUNE_SECTIONS = (FinetuneOptions, TaskDataOptions, OptimOptions, RunOptions)
TASK_SECTIONS = (TaskOptions, TaskDataOptions, KDOptions, OptimOptions, RunOptions)

# The usual BERT fine-tuning recipe (Devlin et al.: AdamW, β2 0.999, ε 1e-8, decay 0.01, 10% warmup, clip 1.0);
# flags and --config files override it.
FINETUNE_PROFILE = {
    "lr": 5e-5,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.01,
    "warmup": 0.1,
    "clip": 1.0,
    "steps": 1000,
    "log_every": 10,
}

# The bundled default (`distill task` with no arguments), measured on the 2-core CPU: 5.3 min from a cold cache
# (2.6 min for the teacher), 2.6 min with the teacher cached, on an otherwise idle machine; a loaded one takes up to
# twice that. BBC News topics are named in an article's first lines, so 128 tokens lose little; the teacher needs
# ~1.3 epochs to reach 97%, while a student starting from MiniLM layers is near its plateau within one epoch.
DEMO_TEACHER = {"steps": 150, "batch_size": 16, "max_seq_len": 128, "lr": 1e-4, "log_every": 10}
DEMO_TASK = {
    "student_num_layers": 3,
    "steps": 100,
    "batch_size": 16,
    "max_seq_len": 128,
    "lr": 3e-4,
    "log_every": 10,
    "out": "runs/task",
}
DEMO_TEACHER_RUN = "minilm-l6-bbc-classifier"


# ---- data ------------------------------------------------------------------------------------------------------------


class EpochBatches:
    """Endless, resumable training batches: epoch e is one pass in the seeded order of (seed, e).

    The data position (epoch, batches taken from it) is the checkpointed state; resuming rebuilds the epoch's
    order from its seed and skips the batches already taken (padding only, no model work).

    Args:
        make_epoch: seed → iterator over one epoch's batches (dicts of CPU tensors).
        seed: the run's seed.
    """

    def __init__(self, make_epoch: Callable[[int], Iterator[dict]], seed: int):
        self.make_epoch, self.seed = make_epoch, seed
        self.epoch = 0
        self.position = 0
        self._it: Iterator[dict] | None = None

    def _epoch_seed(self) -> int:
        return self.seed * 1_000_003 + self.epoch  # distinct per (seed, epoch) for any seed below ~10^12

    def next_batch(self) -> dict:
        while True:
            if self._it is None:
                self._it = self.make_epoch(self._epoch_seed())
                for _ in range(self.position):
                    next(self._it, None)
            batch = next(self._it, None)
            if batch is not None:
                self.position += 1
                return batch
            if self.position == 0:
                raise ValueError("the training data yields no batch: give more examples or lower --batch-size")
            self.epoch, self.position, self._it = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None


@dataclass
class EvalSet:
    """Validation data as fixed CPU batches, with what scoring needs.

    Attributes:
        batches: CPU batches in order (input_ids/attention_mask int64 (B, L), plus token_type_ids for QA).
        labels: classification: N gold class ids; None for QA.
        examples, features: QA: the examples and their windows, in the order the batches hold them.
    """

    batches: list[dict]
    labels: list[int] | None = None
    examples: list[QAExample] | None = None
    features: QAFeatures | None = None
    pad_id: int = 0  # QA: the tokenizer's pad id, to rebatch a prefix

    @property
    def size(self) -> int:
        """Examples scored (QA: questions)."""
        return len(self.labels) if self.labels is not None else len(self.examples)

    def head(self, n_batches: int) -> "EvalSet":
        """The first `n_batches` batches (all when 0), cut to whole examples, for quick evaluations in training."""
        if not n_batches or n_batches >= len(self.batches):
            return self
        batches = self.batches[:n_batches]
        n = sum(len(b["input_ids"]) for b in batches)
        if self.labels is not None:
            return EvalSet(batches, labels=self.labels[:n])
        f = self.features
        # Keep the examples whose windows all lie in the prefix: those before the last window's example.
        n_examples = f.example_index[n] if n < len(f) else len(self.examples)
        n = f.example_index.index(n_examples) if n_examples < len(self.examples) else len(f)
        cut = QAFeatures(*(getattr(f, k)[:n] for k in QAFeatures.__dataclass_fields__))
        batches = list(qa_batches(cut, len(self.batches[0]["input_ids"]), self.pad_id))
        return EvalSet(batches, examples=self.examples[:n_examples], features=cut, pad_id=self.pad_id)


@dataclass
class TaskData:
    """A task's tokenized training and validation data."""

    task: str
    tokenizer: object
    train: EpochBatches
    eval: EvalSet
    batches_per_epoch: int
    n_train: int  # training examples (QA: questions)
    n_train_windows: int  # training sequences (QA: windows; classification: = n_train)
    label2id: dict[str, int] | None = None  # classification: the label map the ids follow


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")


def seq_len(data: TaskDataOptions, task: str) -> int:
    return data.max_seq_len or DEFAULT_SEQ_LEN[task]


def load_classification_split(data: TaskDataOptions) -> tuple[ClassificationData, ClassificationData]:
    """Training and validation examples: --validation-data (ids follow the training map, unknown names fail), or
    a stratified split of --data by (validation_fraction, split_seed)."""
    if not data.data:
        raise ValueError("--data is required: training examples (csv/tsv/json/jsonl, a saved dataset or a folder)")
    train_data = load_classification(data.data, data.text_column, data.label_column)
    if data.validation_data:
        val = load_classification(data.validation_data, data.text_column, data.label_column, train_data.label2id)
        return train_data, val
    train_idx, val_idx = train_validation_split(
        len(train_data), data.validation_fraction, data.split_seed, stratify_labels=train_data.labels
    )
    return train_data.subset(train_idx), train_data.subset(val_idx)


def relabel(data: ClassificationData, label2id: dict[str, int]) -> ClassificationData:
    """The same examples with ids following `label2id` (the same names, perhaps in another order)."""
    names = data.id2label
    return ClassificationData(data.texts, [label2id[names[y]] for y in data.labels], dict(label2id))


def _resumable(make_epoch: Callable[[int, bool], Iterator[dict]], n: int, batch_size: int, seed: int) -> EpochBatches:
    # A last batch smaller than the others gives a noisier step; drop it, unless it is the only one.
    drop_last = n >= batch_size
    return EpochBatches(lambda s: make_epoch(s, drop_last), seed)


def prepare_classification(train_data: ClassificationData, val: ClassificationData, tokenizer, data: TaskDataOptions,
                           seed: int) -> TaskData:  # fmt: skip
    """Tokenize both splits and build resumable training batches and fixed validation batches."""
    max_len = seq_len(data, "classification")
    train_ids = encode_classification(train_data.texts, tokenizer, max_len)["input_ids"]
    val_ids = encode_classification(val.texts, tokenizer, max_len)["input_ids"]
    pad = tokenizer.pad_token_id

    def make_epoch(s: int, drop_last: bool) -> Iterator[dict]:
        return classification_batches(train_ids, train_data.labels, data.batch_size, pad, seed=s, drop_last=drop_last)

    n = len(train_ids)
    eval_batches = list(classification_batches(val_ids, val.labels, data.batch_size, pad, shuffle=False))
    per_epoch = n // data.batch_size if n >= data.batch_size else 1
    return TaskData(
        "classification", tokenizer, _resumable(make_epoch, n, data.batch_size, seed),
        EvalSet(eval_batches, labels=list(val.labels)), per_epoch, n, n, train_data.label2id,
    )  # fmt: skip


def prepare_qa(data: TaskDataOptions, tokenizer, seed: int) -> TaskData:
    """SQuAD v1.1 examples → windows (labels: answer token span, or [CLS] outside the window) → batches."""
    if not data.data:
        raise ValueError("--data is required: a SQuAD v1.1 JSON file")
    examples = [ex for path in data.data for ex in load_squad(path)]
    if data.validation_data:
        val = [ex for path in data.validation_data for ex in load_squad(path)]
    else:
        train_idx, val_idx = train_validation_split(len(examples), data.validation_fraction, data.split_seed)
        examples, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
    kw = dict(max_seq_len=seq_len(data, "qa"), doc_stride=data.doc_stride, max_query_len=data.max_query_len)
    train_f = prepare_features(examples, tokenizer, **kw)
    val_f = prepare_features(val, tokenizer, **kw)
    pad = tokenizer.pad_token_id

    def make_epoch(s: int, drop_last: bool) -> Iterator[dict]:
        return qa_batches(train_f, data.batch_size, pad, shuffle=True, seed=s, drop_last=drop_last)

    n = len(train_f)
    per_epoch = n // data.batch_size if n >= data.batch_size else 1
    eval_set = EvalSet(list(qa_batches(val_f, data.batch_size, pad)), examples=val, features=val_f, pad_id=pad)
    return TaskData("qa", tokenizer, _resumable(make_epoch, n, data.batch_size, seed), eval_set, per_epoch,
                    len(examples), n)  # fmt: skip


# ---- models ----------------------------------------------------------------------------------------------------------


def has_task_head(path: str | Path, task: str) -> bool:
    """Whether the checkpoint holds the task's head (a classifier, or the QA span layer); headers only."""
    return any(k.endswith(HEAD_KEY[task]) for k in ckpt.checkpoint_keys(path))


def _generic_names(id2label: dict[int, str] | None) -> bool:
    """transformers' placeholder names LABEL_0, LABEL_1, ... (a checkpoint that never saw the label names)."""
    return id2label is None or all(name == f"LABEL_{i}" for i, name in id2label.items())


def teacher_label_map(teacher_dir: str | Path, data_label2id: dict[str, int]) -> dict[str, int]:
    """The teacher's label → id map, checked against the data's label set.

    KD compares the teacher's class distribution with the student's position by position, so both must mean the
    same class at each id: the data's labels are renumbered to the teacher's ids (the same names, in any order).

    Raises:
        ValueError: the label sets differ, or the teacher has only placeholder names (LABEL_i) that cannot be
            matched to the data's (integer labels 0..C−1 are taken to be LABEL_0..LABEL_{C−1}).
    """
    cfg = ModelConfig.from_pretrained(teacher_dir)
    ours = sorted(data_label2id)
    if _generic_names(cfg.id2label):
        if sorted(data_label2id.values()) == list(range(cfg.num_labels)) and ours == sorted(
            str(i) for i in range(cfg.num_labels)
        ):
            return {str(i): i for i in range(cfg.num_labels)}
        raise ValueError(
            f"teacher {teacher_dir} names its {cfg.num_labels} classes only LABEL_0..LABEL_{cfg.num_labels - 1}, "
            f"so they cannot be matched to the data's labels {ours}; write the class names into id2label/label2id "
            "of its config.json (in the teacher's id order) or fine-tune the teacher with `distill finetune`"
        )
    theirs = sorted(cfg.id2label.values())
    if theirs != ours:
        only_t = sorted(set(theirs) - set(ours))
        only_d = sorted(set(ours) - set(theirs))
        raise ValueError(
            f"the teacher {teacher_dir} was trained on labels {theirs} but the data has {ours} "
            f"(only in the teacher: {only_t}; only in the data: {only_d}). Distillation matches class "
            "distributions id by id, so the label sets must be equal: use the teacher's task data, or fine-tune a "
            "teacher on these labels with `distill finetune`"
        )
    return {name: i for i, name in cfg.id2label.items()}


def checkpoint_label_map(path: str | Path, data_label2id: dict[str, int]) -> dict[str, int]:
    """The checkpoint's own label ids when it has a classifier for exactly these label names (continuing a
    fine-tuning keeps its head), else the data's."""
    cfg = ModelConfig.from_pretrained(path)
    if has_task_head(path, "classification") and not _generic_names(cfg.id2label):
        if sorted(cfg.id2label.values()) == sorted(data_label2id):
            return {name: i for i, name in cfg.id2label.items()}
    return data_label2id


def _classifier_on_encoder(path: str | Path, num_labels: int, dtype, device) -> torch.nn.Module:
    """A fresh classifier on a checkpoint's encoder, keeping BERT's pooler when the file has one.

    `ckpt.load_model(head="classification")` refuses a bare BertModel checkpoint (pooler present, classifier
    absent: "half a head"), though that is the usual starting point of fine-tuning (transformers loads the pooler
    and initializes the classifier); so the model is assembled here from the encoder and the pooler tensors.
    """
    encoder = ckpt.load_model(path, head=None, dtype=dtype, device=device)[0]
    config = encoder.config.replace(num_labels=num_labels, id2label=None, label2id=None)
    with torch.device(device):
        model = build_model(config, "classification")
    model.to(dtype or torch.float32)
    model.encoder = encoder
    tensors = {k.removeprefix("bert."): v for k, v in ckpt.read_tensors(path)[0].items() if "pooler." in k}
    if config.arch == "bert" and {"pooler.dense.weight", "pooler.dense.bias"} <= tensors.keys():
        with torch.no_grad():
            model.pooler.weight.copy_(tensors["pooler.dense.weight"])
            model.pooler.bias.copy_(tensors["pooler.dense.bias"])
    return model.eval()


def load_task_model(path: str | Path, task: str, label2id: dict[str, int] | None, device: torch.device,
                    dtype: torch.dtype | None = None) -> torch.nn.Module:  # fmt: skip
    """A checkpoint as a SequenceClassifier (for `label2id`) or QuestionAnswerer.

    A checkpoint without the head gets a fresh one. A classifier trained for other labels (another count, or
    other names) is replaced by a fresh one for these labels: its body is kept, as when fine-tuning from any
    checkpoint. The config records `label2id`/`id2label`, so the saved checkpoint names its classes.
    """
    if task == "qa":
        return ckpt.load_model(path, head="qa", dtype=dtype, device=device)[0]
    n = len(label2id)
    cfg = ModelConfig.from_pretrained(path)
    id2label = {i: name for name, i in label2id.items()}
    if has_task_head(path, task) and (
        cfg.num_labels != n or (cfg.id2label != id2label and not _generic_names(cfg.id2label))
    ):
        model = ckpt.load_model(path, head="classification", dtype=dtype, device=device)[0]
        print(f"{path}: its classifier is for {cfg.num_labels} other labels; a new one is trained for {n} labels")
        fresh = torch.nn.Linear(model.config.hidden_size, n, device=device, dtype=model.classifier.weight.dtype)
        with torch.no_grad():
            fresh.weight.normal_(0.0, model.config.initializer_range)
            fresh.bias.zero_()
        model.classifier = fresh
    elif has_task_head(path, task):
        model = ckpt.load_model(path, head="classification", dtype=dtype, device=device, num_labels=n)[0]
    else:
        model = _classifier_on_encoder(path, n, dtype, device)
    model.config = model.config.replace(id2label=id2label, label2id=dict(label2id))
    return model


def check_lengths(max_len: int, tokenizer, *models) -> None:
    """Every model must take `max_len` positions and every id the tokenizer makes (checked once, up front, so that
    training steps can skip the per-forward id check, which reads the ids back to the host)."""
    for m in models:
        c = m.config
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"--max-seq-len {max_len} exceeds a model's position table ({c.max_position_embeddings} positions); "
                f"lower --max-seq-len to {c.max_position_embeddings} or less"
            )
        if len(tokenizer) > c.vocab_size:
            raise ValueError(
                f"tokenizer/vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but a model's vocabulary "
                f"has {c.vocab_size}; use the model's own tokenizer"
            )
        m.encoder.validate_inputs = False


def _describe(model) -> str:
    c = model.config
    return f"{c.arch}, {c.num_layers} layers, hidden {c.hidden_size}, {count_parameters(model) / 1e6:.1f}M params"


# ---- objective -------------------------------------------------------------------------------------------------------


def to_device(batch: dict, device: torch.device) -> dict:
    """A CPU batch on the device (pinned and non-blocking on CUDA, so the copy overlaps the previous step)."""
    nb = device.type == "cuda"
    return {k: (v.pin_memory() if nb else v).to(device, non_blocking=nb) for k, v in batch.items()}


def qa_ce_loss(start_logits, end_logits, start_positions, end_positions, attention_mask) -> torch.Tensor:
    """½(CE_start + CE_end) over positions, pad positions excluded (their logits set to the fp32 minimum).

    Args:
        start_logits, end_logits: (B, L) float logits; start_positions, end_positions: (B,) int64 in [0, L);
        attention_mask: (B, L) 0/1.
    Returns:
        () fp32 loss.
    """
    pad = ~attention_mask.bool()
    lo = torch.finfo(torch.float32).min
    start = cross_entropy(start_logits.float().masked_fill(pad, lo), start_positions)
    end = cross_entropy(end_logits.float().masked_fill(pad, lo), end_positions)
    return (start + end) / 2


class TaskLoss:
    """One micro-batch's loss: fine-tuning (no teacher) or task distillation.

    Args:
        task: "classification" or "qa".
        student: SequenceClassifier or QuestionAnswerer being trained.
        teacher: the same head type, frozen in eval mode, or None (plain fine-tuning).
        kd: the weights and temperature (with a teacher).
        device: where the batch goes.
    Call: CPU batch dict → (loss () fp32, {"ce", and "kd" with a teacher: () fp32 detached}).
    """

    def __init__(self, task: str, student, teacher=None, kd: KDOptions | None = None, device=None):
        self.task, self.student, self.teacher, self.kd = task, student, teacher, kd
        self.device = torch.device("cpu") if device is None else device
        if teacher is not None:
            if kd is None:
                raise ValueError("distillation needs KDOptions")
            if kd.temperature <= 0:
                raise ValueError(f"--temperature must be > 0, got {kd.temperature}")
            if task == "classification" and not 0.0 <= kd.alpha <= 1.0:
                raise ValueError(f"--alpha must lie in [0, 1], got {kd.alpha}")
            if task == "qa" and (kd.alpha_ce < 0 or kd.alpha_qa < 0 or kd.alpha_ce == kd.alpha_qa == 0):
                raise ValueError(f"--alpha-ce and --alpha-qa must be ≥ 0, not both 0; got {kd.alpha_ce}, {kd.alpha_qa}")

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = to_device(batch, self.device)
        ids, mask, types = b["input_ids"], b["attention_mask"], b.get("token_type_ids")
        s = self.student(ids, mask, types)
        t = None
        if self.teacher is not None:
            with torch.no_grad():
                t = self.teacher(ids, mask, types)
        kd = self.kd
        if self.task == "classification":
            if t is None:
                ce = cross_entropy(s.logits, b["labels"])  # (B, C) → ()
                return ce, {"ce": ce.detach()}
            return classification_kd_loss(s.logits, t.logits, b["labels"], kd.alpha, kd.temperature)
        sp, ep = b["start_positions"], b["end_positions"]
        if t is None:
            ce = qa_ce_loss(s.start_logits, s.end_logits, sp, ep, mask)
            return ce, {"ce": ce.detach()}
        return qa_kd_loss(
            s.start_logits, s.end_logits, t.start_logits, t.end_logits, sp, ep, mask,
            alpha_qa=kd.alpha_qa, alpha_ce=kd.alpha_ce, temperature=kd.temperature,
        )  # fmt: skip


# ---- evaluation and speed --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict(model, batches: list[dict], device: torch.device, precision: str) -> tuple[list, float]:
    """Forward every batch in eval mode (the mode is restored after).

    Returns:
        (outputs, seconds): classification: one fp32 CPU (N, C) logits tensor; QA: (start rows, end rows), lists
        of F fp32 CPU rows of each window's padded length; seconds of forward passes, device synchronized.
    """
    was_training = model.training
    model.eval()
    outs = []
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        b = to_device(batch, device)
        with autocast(device, precision):
            outs.append(model(b["input_ids"], b["attention_mask"], b.get("token_type_ids")))
    _sync(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if hasattr(outs[0], "logits"):
        return torch.cat([o.logits.float() for o in outs]).cpu(), seconds  # (N, C)
    start = [row for o in outs for row in o.start_logits.float().cpu()]
    end = [row for o in outs for row in o.end_logits.float().cpu()]
    return (start, end), seconds


def evaluate_model(model, eval_set: EvalSet, device, precision, data: TaskDataOptions) -> dict:
    """Validation scores: accuracy and macro-F1 (fractions in [0, 1]) for classification; SQuAD exact match and F1
    (percentages, the official normalization) for QA; plus the seconds the forward passes took."""
    out, seconds = predict(model, eval_set.batches, device, precision)
    timing = {"eval_seconds": round(seconds, 3)}
    if eval_set.labels is not None:
        preds = out.argmax(-1)
        return {
            "accuracy": accuracy(preds, eval_set.labels),
            "macro_f1": macro_f1(preds, eval_set.labels, out.shape[1]),
            **timing,
        }
    answers = postprocess(eval_set.examples, eval_set.features, *out, n_best=data.n_best,
                          max_answer_len=data.max_answer_len)  # fmt: skip
    return {**squad_evaluate(answers, eval_set.examples), **timing}


def single_example_batch(eval_set: EvalSet, pad_id: int) -> dict:
    """The first validation sequence alone, padded as in training (to a multiple of 8)."""
    first = eval_set.batches[0]
    n = int(first["attention_mask"][0].sum())
    ids, mask = pad_to_multiple([first["input_ids"][0, :n].tolist()], pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in first:
        out["token_type_ids"], _ = pad_to_multiple([first["token_type_ids"][0, :n].tolist()], 0)
    return out


@torch.no_grad()
def measure_speed(models: dict, eval_set: EvalSet, pad_id: int, device: torch.device, precision: str,
                  iters: int = 10, warmup: int = 2, throughput_batches: int = 3) -> dict[str, dict]:  # fmt: skip
    """Inference speed of each model on the current device, in eval mode under autocast.

    Latency: median milliseconds of a forward pass on one sequence (batch 1), over `iters` passes. Throughput:
    sequences per second on full validation batches (`batch_size` sequences; QA: windows), the median over
    `throughput_batches` batches. Each pass follows `warmup` untimed ones, and the models take turns pass by pass,
    so that a machine whose load changes during the measurement (a shared CPU) slows them all alike.

    Returns:
        {name: {"latency_ms": float, "throughput": float}}, or {name: {}} when iters = 0.
    """
    if iters <= 0:
        return {name: {} for name in models}
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    one = to_device(single_example_batch(eval_set, pad_id), device)
    full = [to_device(b, device) for b in eval_set.batches[:throughput_batches]]
    full = [b for b in full if len(b["input_ids"]) == len(full[0]["input_ids"])] or full[:1]  # equal sizes only

    def timed(model, b) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        _sync(device)
        return time.perf_counter() - t0

    latency = {name: [] for name in models}
    rate = {name: [] for name in models}
    for i in range(warmup + iters):
        for name, m in models.items():
            dt = timed(m, one)
            if i >= warmup:
                latency[name].append(dt)
    for i in range(1 + len(full)):  # one untimed warm-up batch, then each batch once
        b = full[max(i - 1, 0)]
        for name, m in models.items():
            dt = timed(m, b)
            if i >= 1:
                rate[name].append(len(b["input_ids"]) / dt)
    for name, m in models.items():
        m.train(modes[name])
    return {
        name: {
            "latency_ms": round(1000 * statistics.median(latency[name]), 3),
            "throughput": round(statistics.median(rate[name]), 2),
        }
        for name in models
    }


# ---- training runs ---------------------------------------------------------------------------------------------------


def _steps_from_epochs(optim: OptimOptions, data: TaskDataOptions, td: TaskData) -> OptimOptions:
    if data.epochs > 0:
        return replace(optim, steps=max(1, math.ceil(data.epochs * td.batches_per_epoch / optim.grad_accum)))
    return optim


def _loss_summary(history: list[dict], curve_path: Path) -> dict:
    lines = [h for h in history if "loss" in h]
    curve = plot_curves(history, curve_path, keys=("loss", "kd", "ce"))
    return {
        "first_loss": lines[0]["loss"] if lines else None,
        "last_loss": lines[-1]["loss"] if lines else None,
        "loss_curve": str(curve) if curve else None,
    }


def run_phase(name: str, model, loss_fn: TaskLoss, td: TaskData, optim: OptimOptions, run: RunOptions,
              phase_dir: Path, model_out: Path, device, precision, tokenizer_dir, record: dict,
              data: TaskDataOptions) -> dict:  # fmt: skip
    """Train one model on the shared loop in `phase_dir` (metrics.jsonl, checkpoint/), evaluate it on the whole
    validation set and save it to `model_out`. A phase that finished before (its result.json) is not rerun on
    --resume; one interrupted is continued from its checkpoint.

    Returns:
        {"metrics", "steps", "train_seconds", "first_loss", "last_loss", "loss_curve"}, or {"interrupted", "step"}.
    """
    phase_dir.mkdir(parents=True, exist_ok=True)
    done = phase_dir / "result.json"
    if run.resume and done.is_file() and (model_out / "config.json").is_file():
        print(f"{name}: finished before; results read from {done}, model from {model_out}")
        ckpt.load_state_into(model, model_out)  # the trained weights, for what follows (speed, later phases)
        return json.loads(done.read_text())
    resume = run.resume and (phase_dir / "checkpoint" / "trainer_state.pt").is_file()
    if not resume:
        (phase_dir / "metrics.jsonl").unlink(missing_ok=True)  # the loop appends: start a fresh log
    quick = td.eval.head(run.eval_batches)

    def evaluate(step: int) -> dict:
        return evaluate_model(model, quick, device, precision, data)

    if run.compile:
        model.encoder = torch.compile(model.encoder)
    result = train(
        model, loss_fn, td.train, optim, replace(run, resume=resume), phase_dir, device, precision,
        tokenizer_dir=tokenizer_dir, evaluate=evaluate, tokens_in=lambda b: b["attention_mask"].sum(),
        options_record=record,
    )  # fmt: skip
    if result.interrupted:
        return {"interrupted": True, "step": result.step}
    metrics = evaluate_model(model, td.eval, device, precision, data)
    ckpt.save_model(model, model_out, tokenizer_dir=tokenizer_dir)
    out = {
        "metrics": metrics,
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        **_loss_summary(read_history(phase_dir / "metrics.jsonl"), phase_dir / "loss_curve.png"),
    }
    write_json(done, out)
    return out


def _interrupted(step: int, out: Path) -> dict:
    print(f"interrupted at step {step}; checkpoint saved under {out}; continue with --resume")
    return {"interrupted": True, "step": step}


def _fmt_metrics(task: str, m: dict) -> tuple[str, str]:
    if task == "classification":
        return f"{100 * m['accuracy']:.2f}", f"{100 * m['macro_f1']:.2f}"
    return f"{m['exact_match']:.2f}", f"{m['f1']:.2f}"


def _table(task: str, rows: list[tuple[str, dict]]) -> str:
    header = ("model", "params", "layers", "hidden") + (
        ("accuracy %", "macro-F1 %") if task == "classification" else ("EM", "F1")
    )
    header += ("latency ms (b=1)", "throughput /s")
    lines = []
    for name, r in rows:
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}"
        rate = "-" if r.get("throughput") is None else f"{r['throughput']:.1f}"
        lines.append(
            (name, f"{r['parameters'] / 1e6:.1f}M", str(r["layers"]), str(r["hidden_size"]),
             *_fmt_metrics(task, r), lat, rate)
        )  # fmt: skip
    return format_table(lines, header)


def _model_entry(path, model, metrics: dict, speed: dict) -> dict:
    c = model.config
    return {
        "path": str(path),
        "arch": c.arch,
        "parameters": count_parameters(model),
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        **metrics,
        **speed,
    }


def _setup(run: RunOptions, task: str) -> tuple[torch.device, str]:
    _check_task(task)
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    return device, precision


def _prepare_data(task: str, data: TaskDataOptions, tokenizer_dir, seed: int, label2id_of=None) -> TaskData:
    """Tokenizer and data; `label2id_of(train label2id) → label2id` renumbers classification labels (teacher map)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if task == "qa":
        return prepare_qa(data, tokenizer, seed)
    train_data, val = load_classification_split(data)
    if label2id_of is not None:
        label2id = label2id_of(train_data.label2id)
        train_data, val = relabel(train_data, label2id), relabel(val, label2id)
    return prepare_classification(train_data, val, tokenizer, data, seed)


def finetune(ft: FinetuneOptions, data: TaskDataOptions, optim: OptimOptions, run: RunOptions) -> dict:
    """Plain fine-tuning of `ft.model` on the task (how teachers are made); the model goes to `<out>/model`.

    Returns:
        the report (also `<out>/report.json`): validation scores, latency, loss summary; or {"interrupted": True}.
    """
    device, precision = _setup(run, ft.task)
    if not ft.model:
        raise ValueError("--model is required (the no-argument default sets the bundled MiniLM)")
    model_dir = Path(ft.model)
    ModelConfig.from_pretrained(model_dir)  # a clear error for a wrong path before the data work
    record = to_dict(ft, data, optim, run)
    td = _prepare_data(ft.task, data, model_dir, run.seed, lambda ours: checkpoint_label_map(model_dir, ours))
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    model = load_task_model(model_dir, ft.task, td.label2id, device)
    check_lengths(seq_len(data, ft.task), td.tokenizer, model)
    optim = _steps_from_epochs(optim, data, td)
    print(
        f"fine-tuning {model_dir} ({_describe(model)}) for {ft.task}: {td.n_train} train / {td.eval.size} validation "
        f"examples; {optim.steps} steps; {device} {precision}"
    )
    loss_fn = TaskLoss(ft.task, model, device=device)
    res = run_phase("fine-tuning", model, loss_fn, td, optim, run, out, out / "model", device, precision, model_dir,
                    record, data)  # fmt: skip
    if res.get("interrupted"):
        return _interrupted(res["step"], out)
    speed = measure_speed({"model": model}, td.eval, td.tokenizer.pad_token_id, device, precision, ft.latency_iters)
    report = {
        "task": ft.task,
        "model": _model_entry(out / "model", model, res["metrics"], speed["model"]),
        "validation_examples": td.eval.size,
        "steps": res["steps"],
        "train_seconds": res["train_seconds"],
        "first_loss": res["first_loss"],
        "last_loss": res["last_loss"],
        "loss_curve": res["loss_curve"],
        "device": str(device),
        "precision": precision,
    }
    if td.label2id is not None:
        report["labels"] = sorted(td.label2id, key=td.label2id.get)
    write_json(out / "report.json", report)
    print(_table(ft.task, [("fine-tuned", report["model"])]))
    print(f"loss {report['first_loss']} -> {report['last_loss']} in {report['steps']} steps; model: {out / 'model'}")
    return report


def distill_task(opts: TaskOptions, data: TaskDataOptions, kd: KDOptions, optim: OptimOptions,
                 run: RunOptions) -> dict:  # fmt: skip
    """Distill a fine-tuned teacher into a student on the task; with `opts.baseline`, also fine-tune the same
    student without the teacher; evaluate all three and time teacher and student.

    Outputs under `<out>`: `student/` (the distilled student), `baseline_student/`, the per-run folders `distill/`
    and `baseline/` (metrics.jsonl, checkpoint/, loss_curve.png), `report.json`.

    Returns:
        the report, or {"interrupted": True, "step"}.
    """
    device, precision = _setup(run, opts.task)
    task = opts.task
    if not opts.teacher:
        raise ValueError(
            "--teacher is required: a checkpoint fine-tuned on the task (make one with `distill finetune`)"
        )
    teacher_dir = Path(opts.teacher)
    ModelConfig.from_pretrained(teacher_dir)
    if not has_task_head(teacher_dir, task):
        raise ValueError(
            f"teacher {teacher_dir} has no {task} head ({HEAD_KEY[task]} is not in its weights): it has not been "
            f"fine-tuned for {task}; fine-tune it first with `distill finetune --task {task} --model {teacher_dir}`"
        )
    record = to_dict(opts, data, kd, optim, run)
    label2id_of = (lambda ours: teacher_label_map(teacher_dir, ours)) if task == "classification" else None
    td = _prepare_data(task, data, teacher_dir, run.seed, label2id_of)
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    # Teacher weights in the compute dtype on GPUs (never updated, so no fp32 master copy is needed).
    teacher_dtype = compute_dtype(precision) if device.type == "cuda" else torch.float32
    teacher = load_task_model(teacher_dir, task, td.label2id, device, dtype=teacher_dtype)
    teacher.eval().requires_grad_(False)

    if opts.student:
        student_dir = Path(opts.student)
    else:
        from engine.student import init_student

        source = Path(opts.student_from or teacher_dir)
        student_dir = out / "student_init"
        if not (student_dir / "config.json").is_file():
            init_student(source, student_dir, num_layers=opts.student_num_layers or None, arch=opts.student_arch)

    def new_student():
        torch.manual_seed(run.seed)  # the distilled and the baseline student start from the same weights
        return load_task_model(student_dir, task, td.label2id, device)

    student = new_student()
    from engine.pretrain import check_same_vocabulary

    check_same_vocabulary(teacher_dir, student_dir, teacher, student)
    check_lengths(seq_len(data, task), td.tokenizer, teacher, student)
    optim = _steps_from_epochs(optim, data, td)
    print(
        f"teacher {teacher_dir} ({_describe(teacher)}) -> student {student_dir} ({_describe(student)}); {task}: "
        f"{td.n_train} train / {td.eval.size} validation examples; {optim.steps} steps; {device} {precision}"
    )
    t0 = time.perf_counter()
    teacher_metrics = evaluate_model(teacher, td.eval, device, precision, data)
    print(f"teacher validation {MAIN_METRIC[task]}: {teacher_metrics[MAIN_METRIC[task]]:.4f}")

    distilled = run_phase(
        "distillation", student, TaskLoss(task, student, teacher, kd, device), td, optim, run, out / "distill",
        out / "student", device, precision, teacher_dir, record, data,
    )  # fmt: skip
    if distilled.get("interrupted"):
        return _interrupted(distilled["step"], out / "distill")
    baseline = None
    if opts.baseline:
        base_model = new_student()
        td.train = EpochBatches(td.train.make_epoch, run.seed)  # the same data order as the distilled student
        baseline = run_phase(
            "baseline", base_model, TaskLoss(task, base_model, device=device), td, optim, run, out / "baseline",
            out / "baseline_student", device, precision, teacher_dir, record, data,
        )  # fmt: skip
        if baseline.get("interrupted"):
            return _interrupted(baseline["step"], out / "baseline")
        del base_model

    speed = measure_speed({"teacher": teacher, "student": student}, td.eval, td.tokenizer.pad_token_id, device,
                          precision, opts.latency_iters)  # fmt: skip
    t_speed, s_speed = speed["teacher"], speed["student"]
    key = MAIN_METRIC[task]
    report = {
        "task": task,
        "teacher": _model_entry(teacher_dir, teacher, teacher_metrics, t_speed),
        "distilled_student": _model_entry(out / "student", student, distilled["metrics"], s_speed),
        "validation_examples": td.eval.size,
        "train_examples": td.n_train,
        "metric": key,
        "student_keeps_of_teacher": distilled["metrics"][key] / max(teacher_metrics[key], 1e-9),
        "kd": to_dict(kd)["kd"],
        "steps": distilled["steps"],
        "distill_seconds": distilled["train_seconds"],
        "distill_first_loss": distilled["first_loss"],
        "distill_last_loss": distilled["last_loss"],
        "latency_speedup": t_speed["latency_ms"] / s_speed["latency_ms"] if s_speed else None,
        "throughput_speedup": s_speed["throughput"] / t_speed["throughput"] if s_speed else None,
        "device": str(device),
        "precision": precision,
    }
    rows = [("teacher", report["teacher"]), ("distilled student", report["distilled_student"])]
    if baseline is not None:
        report["baseline_student"] = _model_entry(out / "baseline_student", student, baseline["metrics"], s_speed)
        report["distilled_minus_baseline"] = distilled["metrics"][key] - baseline["metrics"][key]
        report["baseline_seconds"] = baseline["train_seconds"]
        rows.append(("student, no teacher", report["baseline_student"]))
    if td.label2id is not None:
        report["labels"] = sorted(td.label2id, key=td.label2id.get)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "report.json", report)
    print(_table(task, rows))
    line = f"distilled student keeps {100 * report['student_keeps_of_teacher']:.1f}% of the teacher's {key}"
    if baseline is not None:
        diff = report["distilled_minus_baseline"] * (100 if task == "classification" else 1)
        line += f"; {diff:+.2f} points against the same student trained without a teacher"
    if report["latency_speedup"]:
        line += f"; {report['latency_speedup']:.2f}x lower latency, {report['throughput_speedup']:.2f}x throughput"
    print(line)
    print(f"report: {out / 'report.json'}")
    return report


# ---- the bundled default ---------------------------------------------------------------------------------------------


def bundled_teacher(data: TaskDataOptions, run: RunOptions) -> Path:
    """MiniLM fine-tuned on the bundled BBC News training split, made once and cached under `defaults.cache_dir()`.

    The cache key covers the teacher's recipe and the split (validation_fraction, split_seed), so the teacher never
    saw a validation example of the run that uses it.
    """
    split = {"validation_fraction": data.validation_fraction, "split_seed": data.split_seed}
    key = hashlib.sha1(json.dumps({**DEMO_TEACHER, **split}, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = defaults.cache_dir() / f"{DEMO_TEACHER_RUN}-{key}"
    model_dir = run_dir / "model"
    if (run_dir / "report.json").is_file() and (model_dir / "config.json").is_file():
        print(f"bundled teacher: {model_dir} (cached)")
        return model_dir
    print(f"bundled teacher: fine-tuning all-MiniLM-L6-v2 on BBC News once, cached in {run_dir}")
    profile = {
        **FINETUNE_PROFILE,
        **DEMO_TEACHER,
        **split,
        "task": "classification",
        "model": str(defaults.bundled_teacher_dir()),
        "data": [str(defaults.bbc_news_dir())],
        "out": str(run_dir),
        "overwrite": True,
        "device": run.device,
        "precision": run.precision,
        "progress": run.progress,
        "seed": run.seed,
    }
    report = finetune(*build_options(argparse.Namespace(), *FINETUNE_SECTIONS, profile=profile))
    if report.get("interrupted"):
        raise KeyboardInterrupt
    return model_dir


def _bundled_default(args, fields: tuple[str, ...]) -> bool:
    """The no-argument default applies when none of the models and data are named (other flags may be)."""
    if not all(getattr(args, f, None) is None for f in fields):
        return False
    if getattr(args, "task", None) not in (None, "classification"):
        raise ValueError(
            f"the bundled default is BBC News classification; for --task {args.task} give its data and models "
            f"({' / '.join('--' + f for f in fields)})"
        )
    return True


def run_finetune_command(args: argparse.Namespace) -> int:
    """`distill finetune`: exit code 0, or 130 when interrupted (checkpoint saved)."""
    profile = {**FINETUNE_PROFILE, "out": "runs/finetune", "model": str(defaults.bundled_teacher_dir())}
    if _bundled_default(args, ("model", "data")):
        profile.update(DEMO_TEACHER, task="classification", data=[str(defaults.bbc_news_dir())])
    try:
        report = finetune(*build_options(args, *FINETUNE_SECTIONS, profile=profile))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 130 if report.get("interrupted") else 0


def run_task_command(args: argparse.Namespace) -> int:
    """`distill task`: exit code 0, or 130 when interrupted (checkpoint saved)."""
    profile = {**FINETUNE_PROFILE, "out": "runs/task"}
    default = _bundled_default(args, ("teacher", "student", "data"))
    if default:
        profile.update(DEMO_TASK, task="classification", student_from=str(defaults.bundled_teacher_dir()),
                       data=[str(defaults.bbc_news_dir())])  # fmt: skip
    try:
        opts, data, kd, optim, run = build_options(args, *TASK_SECTIONS, profile=profile)
        if default:
            opts.teacher = str(bundled_teacher(data, run))
        report = distill_task(opts, data, kd, optim, run)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 130 if report.get("interrupted") else 0


def register(subparsers) -> None:
    """Add `finetune` and `task` to the `distill` command line (each sets `func`: Namespace → exit code)."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint for classification or QA (makes teachers; no arguments: the demo)"
    )
    p.add_argument("--config", help="JSON or TOML file with options (sections or flat keys); flags win")
    add_options(p, *FINETUNE_SECTIONS)
    p.set_defaults(func=run_finetune_command)
    p = subparsers.add_parser(
        "task", help="task-specific distillation from a fine-tuned teacher (no arguments: the bundled demo)"
    )
    p.add_argument("--config", help="JSON or TOML file with options (sections or flat keys); flags win")
    add_options(p, *TASK_SECTIONS)
    p.set_defaults(func=run_task_command)


__all__ = [
    "EpochBatches",
    "EvalSet",
    "FinetuneOptions",
    "KDOptions",
    "TaskData",
    "TaskDataOptions",
    "TaskLoss",
    "TaskOptions",
    "distill_task",
    "evaluate_model",
    "finetune",
    "load_task_model",
    "measure_speed",
    "qa_ce_loss",
    "register",
    "teacher_label_map",
]

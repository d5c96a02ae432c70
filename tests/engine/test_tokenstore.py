"""The token store: the sequences of `tokenize_corpus`, id for id, streamed and in parallel; reused; bounded memory."""

import json
from pathlib import Path

import pytest
import torch

from engine import tokenstore
from engine.batching import LengthGroupedBatches
from engine.corpus import load_texts, load_tokenizer, split_heldout, split_indices, token_counts, tokenize_corpus
from engine.defaults import bbc_news_dir
from engine.options import DataOptions, MaskingOptions, RunOptions
from engine.tokenstore import TokenStore, build_store


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def articles(tmp_path_factory):
    """40 BBC articles (sports/199.txt holds a Windows-1252 byte) in two folders."""
    d = tmp_path_factory.mktemp("articles")
    for topic in ("sports", "tech"):
        (d / topic).mkdir()
        names = sorted((bbc_news_dir() / topic).glob("*.txt"))[180:200]
        for f in names:
            (d / topic / f.name).write_bytes(f.read_bytes())
    return d


def _assert_same(store: TokenStore, ref, vocab: int):
    seqs = store.sequences()
    assert torch.equal(seqs.offsets, ref.offsets)
    assert torch.equal(seqs.ids.long(), ref.ids.long())
    assert seqs.dropped == ref.dropped
    assert torch.equal(store.counts()[:vocab], token_counts(ref, vocab))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("lengths", [(128, 12), (16, 16)], ids=["recipe", "short"])
def test_store_holds_the_sequences_of_tokenize_corpus(articles, tokenizer, tmp_path, workers, lengths):
    ref = tokenize_corpus(load_texts(articles), tokenizer, *lengths)
    store = build_store([articles], tokenizer, tmp_path, *lengths, workers=workers, progress=False)
    assert store.meta["dtype"] == "uint16" and store.sequences().ids.dtype == torch.uint16  # 2 bytes a token
    assert store.meta["documents"] == 40
    _assert_same(store, ref, len(tokenizer))


def test_lines_stream_like_the_whole_file(tokenizer, tmp_path):
    """A document read line by line gives the tokens of the whole file: CRLF, blank lines, a line longer than a
    tokenizer batch, a Windows-1252 byte, and a UTF-16 file."""
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_bytes(b"Hello world.\r\n\r\nSecond  line,\twith tabs\n" + b"word " * 300_000 + b"\nend")
    (d / "b.txt").write_bytes("caf\xe9 costs \xa33\n".encode("latin-1"))
    (d / "c.txt").write_text("UTF-16 text here\nand a second line\n", encoding="utf-16")
    (d / "d.txt").write_text("   \n")  # blank: skipped, as load_texts does
    ref = tokenize_corpus(load_texts(d), tokenizer, 64, 3)
    _assert_same(build_store([d], tokenizer, tmp_path / "cache", 64, 3, workers=1, progress=False), ref, len(tokenizer))


def test_rows_of_a_jsonl_file_are_documents(tokenizer, tmp_path):
    rows = [{"text": "first row of text " * 20}, {"text": "  "}, {"text": 7}, {"text": "third row"}]
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pytest.importorskip("datasets")
    ref = tokenize_corpus(load_texts(f), tokenizer, 32, 3)
    _assert_same(build_store([f], tokenizer, tmp_path / "cache", 32, 3, workers=1, progress=False), ref, len(tokenizer))


def test_the_store_is_reused_and_rebuilt_when_the_text_changes(tokenizer, tmp_path, monkeypatch):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("some words to tokenize " * 50)
    first = build_store([d], tokenizer, tmp_path / "cache", 32, 3, workers=1, progress=False)
    with monkeypatch.context() as m:
        m.setattr(tokenstore, "_encode", lambda *a, **k: pytest.fail("tokenized again"))
        again = build_store([d], tokenizer, tmp_path / "cache", 32, 3, workers=1, progress=False)
    assert again.folder == first.folder and again.meta == first.meta
    (d / "a.txt").write_text("other words to tokenize " * 50)
    changed = build_store([d], tokenizer, tmp_path / "cache", 32, 3, workers=1, progress=False)
    assert changed.folder != first.folder
    other_len = build_store([d], tokenizer, tmp_path / "cache", 16, 3, workers=1, progress=False)
    assert other_len.folder not in (first.folder, changed.folder)


def test_bad_sources_are_refused_without_reading_them(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        tokenstore.find_sources([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="data file is empty"):
        tokenstore.find_sources([tmp_path / "empty.txt"])
    (tmp_path / "bin.txt").write_bytes(b"\x7fELF\x00\x00\x01" * 100)
    with pytest.raises(ValueError, match="is not a text file"):
        tokenstore.find_sources([tmp_path / "bin.txt"])
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(ValueError, match="unknown data file extension"):
        tokenstore.find_sources([tmp_path / "x.docx"])


def test_batches_over_indices_equal_batches_over_a_copied_subset(articles, tokenizer, tmp_path):
    store = build_store([articles], tokenizer, tmp_path, 64, 12, workers=1, progress=False)
    seqs = store.sequences()
    train_idx, held_idx = split_indices(len(seqs), 0.1, seed=3)
    train, held = split_heldout(tokenize_corpus(load_texts(articles), tokenizer, 64, 12), 0.1, seed=3)
    for copied, idx, shuffle in ((train, train_idx, True), (held, held_idx, False)):
        a = LengthGroupedBatches(copied, 8, 0, seed=5, shuffle=shuffle, max_tokens=300)
        b = LengthGroupedBatches(seqs, 8, 0, seed=5, shuffle=shuffle, max_tokens=300, indices=idx)
        assert len(a) == len(b) and a.state_dict() == b.state_dict()
        for _ in range(len(a) + 3):  # into the next epoch
            x, y = a.next_batch(), b.next_batch()
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.attention_mask, y.attention_mask)


def test_prepare_corpus_from_the_store_equals_the_in_memory_path(articles, minilm_dir, tokenizer, tmp_path):
    from engine.pretrain import prepare_corpus

    data = DataOptions(data=[str(articles)], max_seq_len=64, batch_size=8)
    run = RunOptions(seed=4, eval_batches=0, progress=False)
    args = (MaskingOptions(), run, tmp_path, 30522, torch.device("cpu"))
    mapped = prepare_corpus(tokenizer, data, *args)
    in_memory = prepare_corpus(tokenizer, data, *args, texts=load_texts(articles))
    assert (mapped.n_train, mapped.n_heldout) == (in_memory.n_train, in_memory.n_heldout)
    assert torch.equal(mapped.token_weights, in_memory.token_weights)
    assert len(mapped.eval_batches) == len(in_memory.eval_batches)
    for (a, b), (c, d) in zip(mapped.eval_batches, in_memory.eval_batches):
        assert torch.equal(a, c) and torch.equal(b, d)
    for _ in range(5):
        x, y = mapped.batches.next_batch(), in_memory.batches.next_batch()
        assert torch.equal(x.input_ids, y.input_ids)
    assert list((tmp_path / "cache").glob("tokens-*/ids.bin"))  # the store is in <out>/cache


@pytest.mark.slow
def test_peak_memory_of_tokenizing_is_bounded(tmp_path):
    """A generated 24 MB corpus (about 5M tokens): the building process stays within 100 MB above its baseline after
    imports, and each worker within 400 MB (its forked share of the parent included). The bound does not grow with
    the corpus: two batches a worker in flight and 4 MB write buffers are all the build holds (the README records a
    500 MB corpus within the same bound)."""
    from benchmarks.tokenstore_rss import generate_corpus, measure
    from engine.defaults import bundled_teacher_dir

    corpus = generate_corpus(tmp_path / "corpus", 24, file_mb=8)
    result = measure(corpus, tmp_path / "cache", bundled_teacher_dir(), workers=2)
    assert result["reused_same_store"] and result["reuse_s"] < result["build_s"]
    assert result["tokens"] > 4_000_000
    assert result["peak_rss_above_baseline_mb"] < 100, result
    assert result["largest_worker_rss_mb"] < 400, result
    print(json.dumps(result))


def test_store_files_are_what_the_docstring_says(articles, tokenizer, tmp_path):
    store = build_store([articles], tokenizer, tmp_path, 128, 12, workers=1, progress=False)
    names = sorted(p.name for p in Path(store.folder).iterdir())
    assert names == ["counts.bin", "ids.bin", "meta.json", "offsets.bin"]
    m = store.meta
    assert Path(store.folder, "ids.bin").stat().st_size == 2 * m["num_tokens"]
    assert Path(store.folder, "offsets.bin").stat().st_size == 8 * (m["num_sequences"] + 1)

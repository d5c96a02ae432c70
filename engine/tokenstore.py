"""The token store: a corpus tokenized once, in parallel, into flat files on disk that every rank memory-maps.

Layout of a store (one folder per corpus × tokenizer × lengths, `tokens-<key>/` in the cache folder, written
atomically by rank 0 while the other ranks wait):

    ids.bin      every sequence's token ids back to back ([CLS] … [SEP] each), uint16 when the vocabulary fits,
                 else int32: 2 bytes a token for BERT's 30522 ids
    offsets.bin  int64 (N + 1,): sequence i is ids[offsets[i]:offsets[i + 1]]
    counts.bin   int64 (V,): how often each id occurs (specials included), for `mlm_smoothing`
    meta.json    the key, dtype, counts of documents, sequences, tokens and dropped chunks, and the build's speed

The sequences are those of `engine.corpus.tokenize_corpus`, id for id: each document is tokenized without special
tokens, cut into chunks of `max_seq_len - 2` tokens, each chunk wrapped in [CLS] … [SEP], and chunks shorter than
`min_seq_len` with their specials dropped. What changes is how the text gets there:

  * streamed: a .txt file (one document) is read line by line and its lines' tokens are concatenated; for the
    BERT tokenizers this engine takes, a newline is whitespace that no token spans, so the stream equals the tokens
    of the whole file. .json/.jsonl/.csv files and `save_to_disk` folders go through `datasets` (Arrow, memory-mapped)
    and are read a batch of rows at a time, one document a row;
  * parallel: batches of lines (about 1 MB of text each) go to `workers` processes (fork), each running the Rust
    tokenizer single-threaded; results come back in order, so the store does not depend on the worker count. At
    most two batches per worker are in flight, which bounds the memory of tokenizing: it does not grow with the
    corpus (the tests hold it to a fixed bound);
  * on disk: chunks are appended to the files as they are cut, with a progress bar over the bytes of text.

Reading (`TokenStore.open`) maps the files: the token ids are paged in as batches touch them, so a rank's memory holds
the O(N) offsets and lengths (16 bytes a sequence), not the tokens; the page cache holds what the OS keeps of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The data files' checks (`find_sources`) and decoding are `engine.corpus`'s: the store reads what `load_texts` reads.
from engine.corpus import (
    UTF16_BOMS,
    PathLike,
    Sequences,
    Source,
    _tokenizer_fingerprint,
    check_column,
    chunk_specials,
    decode_bytes,
    find_sources,
    open_dataset,
)

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the splitting rule changes
BATCH_BYTES = 1 << 20  # text per tokenizer call (and per task sent to a worker)
WRITE_BYTES = 4 << 20  # ids buffered before a write
HASH_CHUNK = 8 << 20


# ---- sources ---------------------------------------------------------------------------------------------------------


def _text_lines(path: Path) -> Iterator[str]:
    """A text file's lines, decoded as `engine.corpus.read_text_file` decodes the whole file (UTF-8; UTF-16 with a
    byte-order mark; a line that is not UTF-8 as Windows-1252), without holding more than a line."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head in UTF16_BOMS:
        with open(path, encoding="utf-16") as f:
            yield from f
        return
    with open(path, "rb") as f:
        for raw in f:
            yield decode_bytes(raw)[0]


def _rows(path: Path, text_column: str) -> Iterator[str]:
    """A .json/.jsonl/.csv file's or a saved dataset's non-blank texts, a batch of rows at a time (Arrow, mapped)."""
    ds = open_dataset(path)
    check_column(ds, text_column, path)
    for batch in ds.select_columns([text_column]).iter(batch_size=1000):
        for text in batch[text_column]:
            if isinstance(text, str) and text.strip():
                yield text


def _units(sources: list[Source], text_column: str) -> Iterator[tuple[int, str]]:
    """(document index, text) in order: a .txt document's lines, or one row per document."""
    doc = 0
    for s in sources:
        if s.kind == "txt":
            for line in _text_lines(s.path):
                yield doc, line
            doc += 1
        else:
            for text in _rows(s.path, text_column):
                yield doc, text
                doc += 1


def _batches(units: Iterator[tuple[int, str]]) -> Iterator[tuple[list[int], list[str]]]:
    docs, texts, size = [], [], 0
    for d, t in units:
        docs.append(d)
        texts.append(t)
        size += len(t)
        if size >= BATCH_BYTES:
            yield docs, texts
            docs, texts, size = [], [], 0
    if texts:
        yield docs, texts


def sources_hash(sources: list[Source], text_column: str) -> str:
    """sha256 over every source's name, kind and bytes (a save_to_disk folder: its files), in order."""
    h = hashlib.sha256()
    for s in sources:
        files = sorted(p for p in s.path.rglob("*") if p.is_file()) if s.path.is_dir() else [s.path]
        h.update(f"{s.kind}|{text_column if s.kind == 'rows' else ''}|{len(files)}".encode())
        for p in files:
            h.update(f"|{p.relative_to(s.path) if s.path.is_dir() else p.name}|{p.stat().st_size}|".encode())
            with open(p, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    h.update(chunk)
    return h.hexdigest()


# ---- tokenizing (in worker processes) --------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread a worker: the workers are the parallelism
    _worker_tokenizer = _backend_from(spec)


def _backend_from(spec: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(spec)
    tok.no_truncation()  # a tokenizer.json may carry the model's max length: documents are split here instead
    tok.no_padding()
    return tok


def _encode(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 (T,), lengths int64 (len(texts),)): the texts' tokens back to back, no special tokens."""
    encodings = (tokenizer or _worker_tokenizer).encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths


class _InProcess(Executor):
    """The `workers=1` path: the same calls, in this process (the tokenizer's own threads still run)."""

    def __init__(self, spec: str):
        self.tokenizer = _backend_from(spec)

    def submit(self, fn, *args):
        f: Future = Future()
        f.set_result(_encode(*args, tokenizer=self.tokenizer))
        return f


# ---- cutting and writing ---------------------------------------------------------------------------------------------


class _Writer:
    """Cuts each document's token stream into [CLS] chunk [SEP] sequences and appends them to the store's files."""

    def __init__(self, folder: Path, dtype, inner: int, min_seq_len: int, cls_id: int, sep_id: int, vocab: int):
        self.ids = open(folder / "ids.bin", "wb")  # noqa: SIM115 (closed in close())
        self.lengths = open(folder / "lengths.tmp", "wb")  # noqa: SIM115
        self.dtype, self.inner, self.min_seq_len, self.cls, self.sep = dtype, inner, min_seq_len, cls_id, sep_id
        self.counts = np.zeros(vocab, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_lengths: list[np.ndarray] = []
        self.pending_bytes = 0
        self.carry = np.zeros(0, dtype=np.int32)  # the current document's tokens not yet in a chunk (< inner)
        self.doc_tokens = 0
        self.documents = self.sequences = self.tokens = self.dropped = 0

    def add(self, tokens: np.ndarray) -> None:
        """More tokens of the current document."""
        self.doc_tokens += tokens.size
        buf = np.concatenate([self.carry, tokens]) if self.carry.size else tokens
        full = buf.size // self.inner
        if full:
            self._emit(buf[: full * self.inner].reshape(full, self.inner))
        self.carry = buf[full * self.inner :].copy()

    def end_document(self) -> None:
        self.documents += 1
        if self.doc_tokens == 0:
            self.dropped += 1  # as tokenize_corpus: a document without tokens counts as one dropped sequence
        elif self.carry.size:
            if self.carry.size + 2 < self.min_seq_len:
                self.dropped += 1
            else:
                self._emit(self.carry.reshape(1, -1))
        self.carry = np.zeros(0, dtype=np.int32)
        self.doc_tokens = 0

    def _emit(self, chunks: np.ndarray) -> None:
        k, width = chunks.shape
        seqs = np.empty((k, width + 2), dtype=self.dtype)
        seqs[:, 0], seqs[:, 1:-1], seqs[:, -1] = self.cls, chunks, self.sep
        self.counts += np.bincount(chunks.ravel(), minlength=self.counts.size)[: self.counts.size]
        self.counts[self.cls] += k
        self.counts[self.sep] += k
        self.pending.append(seqs.ravel())
        self.pending_lengths.append(np.full(k, width + 2, dtype=np.int64))
        self.pending_bytes += seqs.nbytes
        self.sequences += k
        self.tokens += seqs.size
        if self.pending_bytes >= WRITE_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            np.concatenate(self.pending).tofile(self.ids)
            np.concatenate(self.pending_lengths).tofile(self.lengths)
            self.pending, self.pending_lengths, self.pending_bytes = [], [], 0

    def close(self, folder: Path) -> None:
        """Flush, then turn the lengths into offsets.bin (streamed: a bounded buffer whatever N is)."""
        self.flush()
        self.ids.close()
        self.lengths.close()
        lengths = np.memmap(folder / "lengths.tmp", dtype=np.int64, mode="r") if self.sequences else np.zeros(0)
        with open(folder / "offsets.bin", "wb") as f:
            np.zeros(1, dtype=np.int64).tofile(f)
            total, step = 0, 1 << 20
            for i in range(0, self.sequences, step):
                part = np.cumsum(lengths[i : i + step], dtype=np.int64) + total
                part.tofile(f)
                total = int(part[-1])
        del lengths
        (folder / "lengths.tmp").unlink()
        self.counts.tofile(folder / "counts.bin")


# ---- the store -------------------------------------------------------------------------------------------------------


@dataclass
class TokenStore:
    """An opened store. `sequences` is an `engine.corpus.Sequences` whose `ids` map ids.bin (uint16 or int32)."""

    folder: Path
    meta: dict

    @classmethod
    def open(cls, folder: PathLike) -> TokenStore:
        folder = Path(folder)
        return cls(folder, json.loads((folder / "meta.json").read_text()))

    def sequences(self):
        """`Sequences` over the mapped files: ids (T,) uint16/int32 (read lazily), offsets (N + 1,) int64 in memory."""
        import torch

        n, t = self.meta["num_sequences"], self.meta["num_tokens"]
        ids = _mapped(self.folder / "ids.bin", np.dtype(self.meta["dtype"]), t)
        offsets = np.fromfile(self.folder / "offsets.bin", dtype=np.int64, count=n + 1)
        return Sequences(torch.from_numpy(ids), torch.from_numpy(offsets), int(self.meta["dropped"]))

    def counts(self):
        """(V,) int64 token counts over the whole store."""
        import torch

        return torch.from_numpy(np.fromfile(self.folder / "counts.bin", dtype=np.int64))


def _mapped(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    # Copy-on-write: a writable array for torch.from_numpy, backed by the file and paged in lazily; nothing writes.
    return np.memmap(path, dtype=dtype, mode="c", shape=(count,))


def store_key(sources: list[Source], text_column: str, tokenizer, max_seq_len: int, min_seq_len: int) -> str:
    parts = [sources_hash(sources, text_column), _tokenizer_fingerprint(tokenizer), str(max_seq_len)]
    parts += [str(min_seq_len), f"store{FORMAT}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def default_workers() -> int:
    """One tokenizing process per CPU core this process may use (at most 32)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 32))


def build_store(
    paths: PathLike | Sequence[PathLike],
    tokenizer,
    cache_dir: PathLike,
    max_seq_len: int = 128,
    min_seq_len: int = 12,
    text_column: str = "text",
    workers: int = 0,
    progress: bool = True,
) -> TokenStore:
    """The store of `paths` tokenized by `tokenizer`: found in `cache_dir` when built before, else built there.

    Args:
        paths: as `engine.corpus.load_texts`.
        tokenizer: a `transformers` fast tokenizer with [CLS] and [SEP].
        cache_dir: where stores live (`tokens-<key>/`).
        max_seq_len, min_seq_len: as `engine.corpus.tokenize_corpus`.
        workers: tokenizing processes (0: `default_workers()`; 1: this process, with the tokenizer's own threads).
        progress: show a progress bar over the bytes of text.
    Returns:
        the opened store; `meta["tokens_per_s"]` says how fast it was built (when it was built now).
    """
    from engine.atomic import atomic_directory

    cls_id, sep_id = chunk_specials(tokenizer, max_seq_len, min_seq_len)
    sources = find_sources(paths, text_column)
    key = store_key(sources, text_column, tokenizer, max_seq_len, min_seq_len)
    folder = Path(cache_dir) / f"tokens-{key[:24]}"
    if (folder / "meta.json").is_file():
        store = TokenStore.open(folder)
        if store.meta.get("key") == key:
            log.info("token store hit: %s", folder)
            return store
    vocab = max(len(tokenizer), cls_id + 1, sep_id + 1)
    dtype = np.uint16 if vocab <= 1 << 16 else np.int32
    workers = workers or default_workers()
    spec = tokenizer.backend_tokenizer.to_str()
    total = sum(sum(p.stat().st_size for p in s.path.rglob("*") if p.is_file()) if s.path.is_dir()
                else s.path.stat().st_size for s in sources)  # fmt: skip
    t0 = time.perf_counter()
    with atomic_directory(folder) as tmp:
        writer = _Writer(Path(tmp), dtype, max_seq_len - 2, min_seq_len, cls_id, sep_id, vocab)
        bar = _progress(total, progress)
        pool = _pool(workers, spec)
        try:
            window: list[tuple[list[int], Future]] = []
            current = 0
            for docs, texts in _batches(_units(sources, text_column)):
                window.append((docs, pool.submit(_encode, texts)))
                bar.update(sum(len(t) for t in texts))
                if len(window) >= 2 * workers:  # at most two batches a worker in flight: bounded memory
                    current = _consume(window.pop(0), writer, current)
            for item in window:
                current = _consume(item, writer, current)
            writer.end_document()
        finally:
            pool.shutdown(cancel_futures=True)
            bar.close()
        writer.close(Path(tmp))
        seconds = time.perf_counter() - t0
        meta = {
            "key": key, "format": FORMAT, "dtype": np.dtype(dtype).name, "documents": writer.documents,
            "num_sequences": writer.sequences, "num_tokens": writer.tokens, "dropped": writer.dropped,
            "max_seq_len": max_seq_len, "min_seq_len": min_seq_len, "text_bytes": total, "workers": workers,
            "seconds": round(seconds, 2), "tokens_per_s": round(writer.tokens / max(seconds, 1e-9)),
            "sources": [str(s.path) for s in sources][:100],
        }  # fmt: skip
        (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"tokenized {writer.documents} documents ({total / 1e6:.1f} MB) into {writer.sequences} sequences "
        f"({writer.tokens} tokens) in {seconds:.1f} s with {workers} processes: {meta['tokens_per_s']} tokens/s; "
        f"dropped {writer.dropped} shorter than {min_seq_len} tokens; store {folder}"
    )
    return TokenStore(folder, meta)


def _consume(item: tuple[list[int], Future], writer: _Writer, current: int) -> int:
    """Hand one batch's tokens to the writer document by document; returns the document being written."""
    docs, future = item
    ids, lengths = future.result()
    ends = np.cumsum(lengths)
    start = 0
    i = 0
    while i < len(docs):
        j = i
        while j + 1 < len(docs) and docs[j + 1] == docs[i]:
            j += 1
        while current < docs[i]:  # the previous document is complete
            writer.end_document()
            current += 1
        stop = int(ends[j])
        writer.add(ids[start:stop])
        start, i = stop, j + 1
    return current


def _pool(workers: int, spec: str) -> Executor:
    if workers <= 1 or sys.platform != "linux":
        return _InProcess(spec)
    import multiprocessing

    # fork: the workers need nothing but the tokenizer spec, and `python -m engine` is no module a spawned child
    # could import without running the command again.
    ctx = multiprocessing.get_context("fork")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,))


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, show: bool):
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", dynamic_ncols=True)

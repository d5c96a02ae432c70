"""Corpus reading and tokenizing: local texts → token-id sequences (batching lives in `engine.batching`).

The DistilBERT recipe's data handling (the original `distillation/scripts` of transformers): each document is tokenized
without special tokens, split on token boundaries into chunks of at most `max_seq_len - 2` tokens,
each chunk wrapped as [CLS] … [SEP]; sequences shorter than `min_seq_len` (the original drops
≤ 11 tokens) are dropped; batches group sequences of similar length so that little compute goes to
padding. Masking happens later, on the device (`engine.masking`).

Sequences are stored flat (`Sequences`: one int32 token array plus int64 offsets), which costs
4 bytes a token instead of a Python object per token, and makes the on-disk cache one `torch.save`.

`datasets` and `transformers` are imported inside the functions that need them: the GPU machine
has no `datasets`, and reading .txt corpora or batching never needs either.

Typical use (the training loop keeps `loader.state_dict()` in its checkpoint):

    texts = load_texts("corpus/")                                   # list[str]
    tok = load_tokenizer(teacher_dir)
    seqs = tokenize_corpus(texts, tok, max_seq_len=128, cache_dir="cache/")
    train, heldout = split_heldout(seqs, fraction=0.05, seed=0)
    loader = engine.batching.LengthGroupedBatches(train, batch_size=32, pad_id=tok.pad_token_id, seed=0)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.atomic import atomic_write, explain_write_errors, tensor_bytes

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
_ACCEPTED = (
    "accepted: a .txt file (one document), a directory of .txt files, a .json/.jsonl/.csv file with a text "
    "column, or a folder written by datasets' save_to_disk"
)
_CACHE_FORMAT = 1  # bump when the cached layout or the splitting rule changes


# ---------------------------------------------------------------------------------------------
# Reading texts
# ---------------------------------------------------------------------------------------------


_non_utf8_noted = False


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # UTF-16 byte-order marks (little-, big-endian)


def _binary_reason(data: bytes) -> str | None:
    """Why `data` is not text, or None. Text has no NUL bytes (UTF-16 aside, which starts with a byte-order mark)
    and few control characters; executables, archives and images have both within their first kilobytes."""
    head = data[:8192]
    if head.startswith(UTF16_BOMS):
        return None
    if b"\x00" in head:
        return "it holds NUL bytes"
    controls = sum(b < 32 and b not in (9, 10, 12, 13, 27) for b in head)
    if head and controls > 0.1 * len(head):
        return f"{100 * controls / len(head):.0f}% of its first bytes are control characters"
    return None


def read_text_file(path: Path) -> str:
    """A text file's contents: UTF-8 (UTF-16 with a byte-order mark), or Windows-1252 for a file that is not valid
    UTF-8. Binary content (an executable or an archive named .txt) is refused: decoded as Windows-1252 it would train
    on byte soup.

    Some public corpora hold a stray single-byte character (BBC News' sports/199.txt has a cp1252 "£", byte 0xA3);
    cp1252 reads it as meant, and `replace` keeps its five undefined bytes from failing a whole corpus. The fallback
    is noted once per process, naming the first such file, not once per file.
    """
    global _non_utf8_noted
    data = path.read_bytes()
    _check_text(path, data)
    if data.startswith(UTF16_BOMS):
        return data.decode("utf-16")
    text, fallback = decode_bytes(data)
    if fallback and not _non_utf8_noted:
        _non_utf8_noted = True
        log.warning("note: %s/%s is not valid UTF-8; read as Windows-1252 (said once)", path.parent.name, path.name)
    return text


def decode_bytes(data: bytes) -> tuple[str, bool]:
    """UTF-8 text, or Windows-1252 (its five undefined bytes replaced) where it is not valid UTF-8; True: the
    fallback was taken. `read_text_file` decodes a whole file with it, `engine.tokenstore` a line at a time."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace"), True


def _check_text(path: Path, head: bytes) -> None:
    """Refuse a file whose first bytes `head` are not text."""
    reason = _binary_reason(head)
    if reason:
        raise ValueError(
            f"{path} is not a text file ({reason}: an executable, archive or image?); remove it from --data"
        )


def _is_blank_file(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return True
    if size > 1 << 20:  # a megabyte of whitespace is not a case worth reading the file for
        return False
    return not path.read_bytes().strip()


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def check_column(ds, text_column: str, source: Path) -> None:
    """A clear error naming `source` and the columns it has when `ds` has no `text_column`."""
    if text_column not in ds.column_names:
        raise ValueError(
            f"{source}: no column {text_column!r}; it has columns {ds.column_names}. "
            "Pass text_column=<one of them> (--text-column on the command line)."
        )


def _column_texts(ds, text_column: str, source: Path) -> list[str]:
    """The non-blank strings of `ds[text_column]`; errors name `source` and the columns it has."""
    check_column(ds, text_column, source)
    values = ds[text_column]
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    if len(texts) < len(values):
        log.info("%s: skipped %d blank or non-string rows", source, len(values) - len(texts))
    return texts


def open_dataset(path: Path):
    """A `datasets.Dataset` of a .json/.jsonl/.csv file or of a `save_to_disk` folder (its "train" split, or its one
    split); errors name the file."""
    try:
        import datasets
    except ImportError as e:  # the GPU machine has no `datasets`: .txt corpora or a token cache work there
        raise ImportError(
            f"reading {path} needs the `datasets` package (pip install datasets), or give .txt files instead"
        ) from e

    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" in ds:
                ds = ds["train"]
            elif len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise ValueError(f"{path}: a DatasetDict with splits {list(ds)} and no 'train'; save one split")
        return ds
    builder = "csv" if path.suffix.lower() == ".csv" else "json"
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets' own errors for malformed files rarely name the file
        raise ValueError(f"could not read {path} as {builder}: {type(e).__name__}: {e}") from e


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "txt" (one document) or "rows" (datasets: one document a row)


def _path_sources(path: Path) -> list[Source]:
    """The sources one given path names, checked without reading them: it exists; a directory is a `save_to_disk`
    folder or holds `*.txt` files (sorted by path, blank ones left out); a file has a known extension and is not
    blank."""
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path} ({_ACCEPTED})")
    if path.is_dir():
        if _is_saved_dataset(path):
            return [Source(path, "rows")]
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(
                f"no .txt files under directory {path}; pass .json/.jsonl/.csv files themselves ({_ACCEPTED})"
            )
        kept = [p for p in files if not _is_blank_file(p)]
        if not kept:
            raise ValueError(f"no text found in {path} (all documents blank)")
        if len(kept) < len(files):
            log.info("%s: skipped %d blank .txt files", path, len(files) - len(kept))
        return [Source(p, "txt") for p in kept]
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".jsonl", ".csv"):
        raise ValueError(f"unknown data file extension {suffix!r} for {path} ({_ACCEPTED})")
    if _is_blank_file(path):
        raise ValueError(f"data file is empty: {path}; remove it from the list or give it text")
    return [Source(path, "txt" if suffix == ".txt" else "rows")]


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[Path]:
    return [Path(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]


def find_sources(paths: PathLike | Sequence[PathLike], text_column: str = "text") -> list[Source]:
    """The files `paths` name, in order (directories: `*.txt` sorted by path, or a `save_to_disk` folder), checked as
    `load_texts` checks them but without reading them: existence, extension, an empty file, a binary one (its first
    bytes). Every path is checked before any file's bytes.

    Raises:
        FileNotFoundError, ValueError: as `load_texts`, naming the file and what to do.
    """
    sources = [s for path in _as_paths(paths) for s in _path_sources(path)]
    if not sources:
        raise ValueError("no data files given: the corpus is empty")
    for s in sources:
        if s.kind == "txt":
            with open(s.path, "rb") as f:
                _check_text(s.path, f.read(8192))
    return sources


def load_texts(paths: PathLike | Sequence[PathLike], text_column: str = "text") -> list[str]:
    """Read documents from local files, in the order given (directories: sorted by path).

    Args:
        paths: one path or a list of them. A `.txt` file is one document (the whole file); a
            directory is either a `datasets.save_to_disk` folder or a tree whose `*.txt` files are
            each one document (blank ones skipped); `.json`/`.jsonl`/`.csv` files are read with
            `datasets`, one document per row, from `text_column`.
        text_column: the column holding the text in .json/.jsonl/.csv files and saved datasets.

    Returns:
        list[str], every entry non-blank.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: an empty file or corpus, an unknown extension, a missing column; the message
            names the file and what to do.
    """
    texts: list[str] = []
    for path in _as_paths(paths):  # one path at a time: its files are read before the next path is checked
        found: list[str] = []
        for source in _path_sources(path):
            if source.kind == "rows":
                found.extend(_column_texts(open_dataset(source.path), text_column, source.path))
            elif (text := read_text_file(source.path)).strip():
                found.append(text)
        if not found:
            raise ValueError(f"no text found in {path} (all documents blank)")
        texts.extend(found)
    if not texts:
        raise ValueError("no data files given: the corpus is empty")
    return texts


def load_tokenizer(path: PathLike):
    """The teacher's own fast tokenizer, from local files only (never the network).

    Args:
        path: a directory with `tokenizer.json` or `vocab.txt` (and usually `tokenizer_config.json`),
            e.g. the teacher checkpoint's directory.

    Returns:
        a `transformers` fast tokenizer with [CLS], [SEP], [PAD] and [MASK] defined.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(
            f"no tokenizer files in {path}: expected tokenizer.json or vocab.txt (with tokenizer_config.json); "
            "copy the teacher's tokenizer files into that directory"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"{path}: got a slow tokenizer ({type(tok).__name__}); tokenizer.json is needed")
    missing = [n for n in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id") if getattr(tok, n) is None]
    if missing:
        raise ValueError(f"{path}: the tokenizer defines no {', '.join(missing)}; a BERT-style tokenizer is needed")
    return tok


# ---------------------------------------------------------------------------------------------
# Token-id sequences
# ---------------------------------------------------------------------------------------------


@dataclass
class Sequences:
    """Token-id sequences stored flat: sequence i is `ids[offsets[i]:offsets[i + 1]]`.

    Attributes:
        ids: (T,) int32, all sequences back to back (each begins with [CLS] and ends with [SEP]).
        offsets: (N + 1,) int64, offsets[0] == 0 and offsets[N] == T.
        dropped: how many sequences were dropped as too short when these were built.
    """

    ids: torch.Tensor
    offsets: torch.Tensor
    dropped: int = 0

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]], dropped: int = 0) -> Sequences:
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
        return cls(ids, offsets, dropped)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sequence i: (len_i,) int32 (a view)."""
        if i < 0:
            i += len(self)
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def num_tokens(self) -> int:
        return self.ids.numel()

    def tolist(self) -> list[list[int]]:
        return [s.tolist() for s in torch.split(self.ids, self.lengths.tolist())]

    def subset(self, indices: torch.Tensor) -> Sequences:
        """The sequences at `indices` ((M,) int64), in that order, as a new flat store."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        lengths = self.lengths[indices]
        offsets = torch.zeros(indices.numel() + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        # token j of the result sits at old_start[seq(j)] + (j - new_start[seq(j)])
        shift = torch.repeat_interleave(self.offsets[:-1][indices] - offsets[:-1], lengths)
        ids = self.ids[shift + torch.arange(int(offsets[-1]), dtype=torch.int64)]
        return Sequences(ids, offsets, self.dropped)


def as_sequences(seqs: Sequences | Sequence[Sequence[int]]) -> Sequences:
    """`seqs` as a `Sequences` (lists of token ids are packed)."""
    return seqs if isinstance(seqs, Sequences) else Sequences.from_lists(seqs)


def _tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the token ids: vocab, normalizer, pre-tokenizer, model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # transformers rewrites these per call (truncation/padding arguments); they change no id here
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    text += f"|cls={tokenizer.cls_token_id}|sep={tokenizer.sep_token_id}"
    return hashlib.sha256(text.encode()).hexdigest()


def _texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        h.update(b)
    return h.hexdigest()


def corpus_cache_key(texts: Sequence[str], tokenizer, max_seq_len: int, min_seq_len: int) -> str:
    """The cache key of `tokenize_corpus`: sha256 of (texts, tokenizer, max_seq_len, min_seq_len, format)."""
    parts = [_texts_hash(texts), _tokenizer_fingerprint(tokenizer), str(max_seq_len), str(min_seq_len)]
    parts.append(str(_CACHE_FORMAT))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def chunk_specials(tokenizer, max_seq_len: int, min_seq_len: int) -> tuple[int, int]:
    """The ([CLS], [SEP]) ids that frame every sequence, once the lengths are checked to leave sequences to keep
    (`tokenize_corpus` and `engine.tokenstore.build_store` cut alike)."""
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len={max_seq_len}: need room for [CLS], one token and [SEP]")
    if min_seq_len > max_seq_len:
        raise ValueError(f"min_seq_len={min_seq_len} > max_seq_len={max_seq_len}: every sequence would be dropped")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("the tokenizer defines no [CLS] or [SEP] token")
    return cls_id, sep_id


def tokenize_corpus(
    texts: Sequence[str],
    tokenizer,
    max_seq_len: int = 128,
    min_seq_len: int = 12,
    cache_dir: PathLike | None = None,
    batch_size: int = 1000,
) -> Sequences:
    """Tokenize documents into [CLS] … [SEP] sequences of `min_seq_len`…`max_seq_len` tokens.

    Each document is tokenized without special tokens (in batches of `batch_size` documents) and
    cut on token boundaries into chunks of `max_seq_len - 2` tokens (the last one shorter); each
    chunk becomes [CLS] + chunk + [SEP]. Chunks shorter than `min_seq_len` tokens with their
    specials are dropped (a document's short tail, or a short document), as the original drops
    sequences of ≤ 11 tokens. Nothing else is lost: the inner tokens of a document's sequences, in
    order, are its tokens up to the dropped tail.

    Args:
        texts: N documents.
        tokenizer: a `transformers` tokenizer with cls_token_id and sep_token_id.
        max_seq_len: the longest sequence, specials included (≥ 3; ≤ the model's positions).
        min_seq_len: the shortest kept sequence, specials included.
        cache_dir: if given, the result is cached there in `tokens-<key>.pt`, keyed by the texts,
            the tokenizer, max_seq_len and min_seq_len; a hit skips tokenization entirely.
        batch_size: documents per tokenizer call.

    Returns:
        `Sequences` (int32 ids, int64 offsets), in document order; `.dropped` counts the dropped
        sequences.
    """
    cls_id, sep_id = chunk_specials(tokenizer, max_seq_len, min_seq_len)

    cache_path = None
    if cache_dir is not None:
        key = corpus_cache_key(texts, tokenizer, max_seq_len, min_seq_len)
        cache_path = Path(cache_dir) / f"tokens-{key[:24]}.pt"
        if cache_path.is_file():
            try:
                obj = torch.load(cache_path, weights_only=True)
                if obj.get("key") == key:
                    log.info("token cache hit: %s", cache_path)
                    return Sequences(obj["ids"], obj["offsets"], int(obj["dropped"]))
                log.warning("token cache %s holds another key; rebuilding", cache_path)
            except Exception as e:  # a truncated or foreign file is rebuilt, never trusted
                log.warning("unreadable token cache %s (%s); rebuilding", cache_path, e)

    inner = max_seq_len - 2
    parts: list[torch.Tensor] = []
    lengths: list[int] = []
    dropped = 0
    for b in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[b : b + batch_size]),
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # documents longer than the model's positions are expected: we split them
        )["input_ids"]
        flat: list[int] = []
        for toks in enc:
            if not toks:
                dropped += 1  # the original would have made [CLS] [SEP] of it, then dropped it
                continue
            for s in range(0, len(toks), inner):
                chunk = toks[s : s + inner]
                if len(chunk) + 2 < min_seq_len:
                    dropped += 1
                    continue
                flat.append(cls_id)
                flat.extend(chunk)
                flat.append(sep_id)
                lengths.append(len(chunk) + 2)
        parts.append(torch.tensor(flat, dtype=torch.int32))  # per batch: host memory stays 4 bytes/token
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=offsets[1:])
    seqs = Sequences(ids, offsets, dropped)
    log.info(
        "tokenized %d documents into %d sequences (%d tokens); dropped %d shorter than %d tokens",
        len(texts),
        len(seqs),
        seqs.num_tokens,
        dropped,
        min_seq_len,
    )
    if cache_path is not None:
        obj = {"key": key, "ids": ids, "offsets": offsets, "dropped": dropped}
        with explain_write_errors(cache_path, "the token cache", lambda: tensor_bytes(obj)):
            atomic_write(cache_path, lambda f: torch.save(obj, f))
    return seqs


def split_heldout(
    sequences: Sequences | Sequence[Sequence[int]], fraction: float = 0.05, seed: int = 0
) -> tuple[Sequences, Sequences]:
    """Split off a held-out set, deterministically: the same input and seed give the same split.

    Uses its own `torch.Generator`, so the global RNG neither affects nor is affected by it. At
    least one sequence is held out when fraction > 0 and there are two or more sequences.

    Returns:
        (train, heldout), each keeping the input order.
    """
    seqs = as_sequences(sequences)
    train, held = split_indices(len(seqs), fraction, seed)
    return seqs.subset(train), seqs.subset(held)


def split_indices(n: int, fraction: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The split of `split_heldout` as indices: (train (n − h,) int64, heldout (h,) int64), each ascending. For a
    memory-mapped token store, which batches these indices instead of copying its sequences."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction {fraction} must be in [0, 1)")
    n_held = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_held = min(max(n_held, 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def token_counts(sequences: Sequences | Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs (specials included), for `masking.smoothing_weights`.

    Returns:
        (vocab_size,) int64.
    """
    seqs = as_sequences(sequences)
    ids = seqs.ids.long()
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"token id {int(ids.max())} ≥ vocab_size={vocab_size}: wrong tokenizer or vocab size?")
    return torch.bincount(ids, minlength=vocab_size)

"""The teacher cache's on-disk format and its readers (`engine.teacher_cache` says what a cache holds and why).

Layout of a cache folder:
    manifest.json                written last: what the cache holds and for what (format version, task, teacher and
                                 tokenizer fingerprints, training-data fingerprint, T, K, rows, bytes)
    options.json                 the options it was started with (an unfinished cache resumes only with the same)
    teacher/                     the teacher's config.json and tokenizer files (no weights): enough for data prep
    shard-00000.json             a shard's summary, written after its arrays: a shard is complete when it exists
    shard-00000.<array>.npy      flat arrays, memory-mapped when read (np.load(mmap_mode="r")):
        values (R, K) fp32, indices (R, K) int32 (absent when dense), lse (R,) fp32      (classification, mlm)
        start_values/end_values (R, W) fp32, start_lse/end_lse (R,) fp32                (qa; W = widest window)
        masked_ids (tokens,) int32, chosen (tokens,) uint8, token_offsets/row_offsets (units + 1,) int64,
        hidden (tokens, H) bf16 bits as int16                                          (mlm)
A cache is refused, with the reason and the fix, when its task, T, format, teacher, tokenizer, training data or
(pretraining) KD rows and hidden states do not match the run (`check_manifest`, `MLMTeacherCache.check`).

Readers: `TaskTeacherCache` (classification, QA: the stored rows of a batch's examples) and `MLMTeacherCache`
(pretraining: `CachedBatch`es of the stored masked copies). The writers are `engine.teacher_cache_write`'s.
"""

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from engine.atomic import atomic_write, write_json
from kernels import SparseTargets

FORMAT = "distill-engine teacher cache"
VERSION = 1
MANIFEST = "manifest.json"
RECORD = "options.json"
TEACHER_DIR = "teacher"
TEACHER_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TASKS = ("classification", "qa", "mlm")

# ---- fingerprints ----------------------------------------------------------------------------------------------------


def teacher_fingerprint(path: str | Path) -> str:
    """sha256 of the teacher's config.json and weight files: the same weights give the same outputs."""
    from engine.checkpoint import weight_files

    h = hashlib.sha256(Path(path, "config.json").read_bytes())
    for f in weight_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def rows_fingerprint(batches: Iterable[dict]) -> str:
    """sha256 of every row's real tokens (input ids, and token types where the batch has them), in batch order: the
    teacher's inputs, whatever their padding."""
    h = hashlib.sha256()
    n = 0
    for b in batches:
        lengths = b["attention_mask"].sum(1).tolist()
        xs = [b[key].to(torch.int32).numpy() for key in ("input_ids", "token_type_ids") if key in b]
        for r, length in enumerate(lengths):
            h.update(length.to_bytes(4, "little"))
            for x in xs:
                h.update(x[r, :length].tobytes())
        n += len(lengths)
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()


class TrainSequences:
    """Pretraining's training split as the batches see it: position p (0 ≤ p < len) is sequence `index[p]` of the
    corpus (`LengthGroupedBatches(..., indices=train)`), or sequence p when the batches hold the split itself."""

    def __init__(self, batches):
        self.seqs, self.index = batches.seqs, getattr(batches, "index", None)

    def __len__(self) -> int:
        return len(self.seqs) if self.index is None else self.index.numel()

    def __getitem__(self, p: int) -> torch.Tensor:
        return self.seqs[int(p) if self.index is None else int(self.index[p])]

    @property
    def lengths(self) -> torch.Tensor:
        return self.seqs.lengths if self.index is None else self.seqs.lengths[self.index]

    def fingerprint(self, chunk: int = 4096) -> str:
        """sha256 of the split's sequences (lengths and ids) in position order."""
        h = hashlib.sha256(self.lengths.numpy().tobytes())
        for p0 in range(0, len(self), chunk):
            ids = [self[p].to(torch.int32) for p in range(p0, min(p0 + chunk, len(self)))]
            h.update(torch.cat(ids).numpy().tobytes())
        return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    from engine.corpus import _tokenizer_fingerprint

    return _tokenizer_fingerprint(tokenizer)


# ---- shards ----------------------------------------------------------------------------------------------------------


def _array_path(cache: Path, j: int, key: str) -> Path:
    return cache / f"shard-{j:05d}.{key}.npy"


def _summary_path(cache: Path, j: int) -> Path:
    return cache / f"shard-{j:05d}.json"


def write_shard(cache: Path, j: int, arrays: dict[str, np.ndarray], summary: dict) -> None:
    """Each array atomically as .npy, then the shard's summary (its presence marks the shard complete)."""
    for key, a in arrays.items():
        a = np.ascontiguousarray(a)
        atomic_write(_array_path(cache, j, key), lambda f, a=a: np.save(f, a, allow_pickle=False))
    write_json(_summary_path(cache, j), {**summary, "arrays": sorted(arrays)})


def shard_done(cache: Path, j: int) -> bool:
    return _summary_path(cache, j).is_file()


def _open_shards(cache: Path, n: int) -> list[dict[str, np.ndarray]]:
    out = []
    for j in range(n):
        summary = json.loads(_summary_path(cache, j).read_text())
        out.append({k: np.load(_array_path(cache, j, k), mmap_mode="r") for k in summary["arrays"]})
    return out


def _gather(shards: list[dict], key: str, shard_of: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Rows `local` of shard `shard_of` (per entry) of array `key`, stacked in the order given."""
    first = shards[int(shard_of[0])][key]
    out = np.empty((len(local), *first.shape[1:]), dtype=first.dtype)
    for j in np.unique(shard_of):
        sel = shard_of == j
        out[sel] = shards[int(j)][key][local[sel]]
    return out


def cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in Path(cache).glob("shard-*.npy"))


# ---- the manifest ----------------------------------------------------------------------------------------------------


def read_manifest(path: str | Path) -> dict:
    """The manifest of a finished cache, or a ValueError that says what is wrong with the folder and what to do."""
    cache = Path(path)
    if not cache.is_dir():
        raise ValueError(f"--teacher-cache {cache}: no such folder; make it with `distill cache-teacher --out {cache}`")
    file = cache / MANIFEST
    if not file.is_file():
        started = (cache / RECORD).is_file()
        raise ValueError(
            f"--teacher-cache {cache} is not a finished teacher cache"
            + (" (it was interrupted: rerun the same `distill cache-teacher` command to finish it)" if started else
               " (no manifest.json): make one with `distill cache-teacher`")
        )  # fmt: skip
    m = json.loads(file.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"--teacher-cache {cache}: {file} is not a teacher-cache manifest")
    if m.get("version") != VERSION:
        raise ValueError(
            f"--teacher-cache {cache} has format version {m.get('version')}, this engine reads version {VERSION}: "
            "rebuild it with `distill cache-teacher`"
        )
    return m


def check_manifest(m: dict, cache: Path, task: str, temperature: float, data_fingerprint: str,
                   tokenizer_fp: str | None = None, teacher: str | Path | None = None) -> None:  # fmt: skip
    """Refuse a cache made for another run: another task, T, tokenizer, teacher, or training rows."""
    rebuild = f"rebuild it with `distill cache-teacher --task {task} ...` for this run"
    if m["task"] != task:
        raise ValueError(f"--teacher-cache {cache} holds a {m['task']} teacher, this run is {task}")
    if not math.isclose(m["temperature"], temperature, rel_tol=0, abs_tol=1e-12):
        raise ValueError(
            f"--teacher-cache {cache} stores the teacher at temperature {m['temperature']:g} (its log-sum-exp depends "
            f"on T), this run uses --temperature {temperature:g}: pass --temperature {m['temperature']:g}, or "
            f"rebuild the cache with --temperature {temperature:g}"
        )
    if tokenizer_fp is not None and m["tokenizer"] != tokenizer_fp:
        raise ValueError(f"--teacher-cache {cache} was made with another tokenizer than this run's; {rebuild}")
    if teacher and Path(teacher, "config.json").is_file():
        if teacher_fingerprint(teacher) != m["teacher"]["fingerprint"]:
            raise ValueError(
                f"--teacher-cache {cache} was made with the teacher {m['teacher']['path']}, whose weights differ "
                f"from --teacher {teacher}; {rebuild}"
            )
    if m["data"] != data_fingerprint:
        raise ValueError(
            f"--teacher-cache {cache} holds the teacher's outputs for other training rows than this run's (other "
            f"data files, split, --max-seq-len, or a cache made for another run); {rebuild}"
        )


# ---- task caches (classification, QA) --------------------------------------------------------------------------------


class ClassifierTargets(NamedTuple):
    logits: SparseTargets  # (B, K) rows over the classes


class QATargets(NamedTuple):
    start_logits: SparseTargets  # (B, L) rows over the batch's positions (pads −inf)
    end_logits: SparseTargets


class TaskTeacherCache:
    """A finished task cache, opened for training: `targets_for(cpu_batch, device)` returns the stored teacher rows of
    the batch's examples (by its "index"/"feature_index") as `ClassifierTargets` / `QATargets` of `SparseTargets`.

    Attributes: `manifest`, `path`, `config` (the teacher's `ModelConfig`), `tokenizer_dir` (the teacher's folder if it
    is still there, else the cache's copy of its config and tokenizer files).
    """

    def __init__(self, path: str | Path, task: str):
        from engine.config import ModelConfig

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.task = task
        if self.manifest["task"] != task:
            raise ValueError(f"--teacher-cache {self.path} holds a {self.manifest['task']} teacher, this run is {task}")
        self.teacher_path = Path(self.manifest["teacher"]["path"])
        self.tokenizer_dir = self.path / TEACHER_DIR
        self.config = ModelConfig.from_pretrained(self.tokenizer_dir)
        self._shards = _open_shards(self.path, self.manifest["shards"])
        self._unit = self.manifest["shard_units"]

    def check(self, td, temperature: float, teacher: str | Path | None = None) -> None:
        """Refuse the cache unless it was made for this run's training rows, T, tokenizer (and --teacher, if given)."""
        data = rows_fingerprint(td.train_in_order(64))
        check_manifest(self.manifest, self.path, self.task, temperature, data, tokenizer_fingerprint(td.tokenizer),
                       teacher)  # fmt: skip

    def teacher_folder(self, teacher: str, student_given: str) -> Path:
        """The folder the run takes the tokenizer, label names and (without --student/--student-from) the student's
        layers from: --teacher, else the teacher the cache was made with, else (that folder gone) the cache's copy of
        its config and tokenizer files, which has no weights to make a student from."""
        folder = Path(teacher or self.teacher_path)
        if (folder / "config.json").is_file():
            return folder
        if not student_given:
            raise ValueError(
                f"the teacher the cache {self.path} was made with ({folder}) is gone, and the student is made from its "
                "layers by default: give --student or --student-from (or --teacher, the same checkpoint elsewhere)"
            )
        return self.tokenizer_dir

    def teacher_metrics(self, td) -> dict:
        """The teacher's validation scores, measured when the cache was made on the same validation rows."""
        if self.manifest["eval_data"] != rows_fingerprint(td.eval.batches):
            raise ValueError(
                f"--teacher-cache {self.path} scored its teacher on other validation rows than this run's: give the "
                "cache run's --validation-data / --validation-fraction / --split-seed, or rebuild the cache"
            )
        return self.manifest["teacher_metrics"]

    def describe(self) -> str:
        t = self.manifest["teacher"]
        return (
            f"{t['arch']}, {t['layers']} layers, hidden {t['hidden_size']}, {t['parameters'] / 1e6:.1f}M params; "
            f"from the cache {self.path}, not in memory"
        )

    def entry(self, metrics: dict) -> dict:
        """The teacher's row of the report, from the manifest (no speed: the teacher does not run)."""
        t = self.manifest["teacher"]
        keys = ("path", "arch", "parameters", "layers", "hidden_size")
        return {**{k: t[k] for k in keys}, **metrics}

    def summary(self) -> dict:
        m = self.manifest
        keys = ("top_k", "dense", "temperature", "units", "bytes", "bytes_per_token", "seconds")
        return {"path": str(self.path), **{k: m[k] for k in keys}}

    def targets_for(self, batch: dict, device: torch.device) -> ClassifierTargets | QATargets:
        key = "index" if self.task == "classification" else "feature_index"
        units = batch[key].numpy()
        shard_of, local = units // self._unit, units % self._unit
        if self.task == "classification":
            values = torch.from_numpy(_gather(self._shards, "values", shard_of, local))
            lse = torch.from_numpy(_gather(self._shards, "lse", shard_of, local))
            if self.manifest["dense"]:
                ids = torch.arange(values.shape[1], dtype=torch.int32).expand(values.shape)
            else:
                ids = torch.from_numpy(_gather(self._shards, "indices", shard_of, local))
            return ClassifierTargets(SparseTargets(*_to(device, values, ids, lse)))
        width = batch["input_ids"].shape[1]
        out = []
        for name in ("start", "end"):
            values = torch.from_numpy(_gather(self._shards, f"{name}_values", shard_of, local))
            if values.shape[1] < width:  # a batch padded past the widest stored window: pads are −inf
                values = torch.nn.functional.pad(values, (0, width - values.shape[1]), value=-math.inf)
            values = values[:, :width]  # positions past the batch's width are pads of every row in it
            lse = torch.from_numpy(_gather(self._shards, f"{name}_lse", shard_of, local))
            ids = torch.arange(width, dtype=torch.int32).expand(values.shape)
            out.append(SparseTargets(*_to(device, values, ids, lse)))
        return QATargets(*out)


def _to(device, *tensors):
    nb = torch.device(device).type == "cuda"
    return [t.pin_memory().to(device, non_blocking=True) if nb else t.to(device) for t in tensors]


# ---- pretraining caches (MLM with static masking) --------------------------------------------------------------------


class MLMTeacherCache:
    """A finished pretraining cache, opened for training: `batch(seq_ids, copy, pad_id)` builds a `CachedBatch` of
    the stored masked copy `copy` of those training sequences with the teacher's rows for them."""

    def __init__(self, path: str | Path):
        from engine.config import ModelConfig

        self.path = Path(path)
        self.manifest = m = read_manifest(self.path)
        if m["task"] != "mlm":
            raise ValueError(
                f"--teacher-cache {self.path} holds a {m['task']} teacher; `distill pretrain` needs one made with "
                "`distill cache-teacher --task mlm`"
            )
        self.teacher_path = Path(m["teacher"]["path"])
        self.tokenizer_dir = self.path / TEACHER_DIR
        self.config = ModelConfig.from_pretrained(self.tokenizer_dir)
        self.copies, self.unit = m["mask_copies"], m["shard_units"]
        self.per_copy = m["shards"] // self.copies
        self._shards = _open_shards(self.path, m["shards"])
        self.seqs = None

    def check(self, seqs: TrainSequences, objective, tokenizer, teacher: str | Path | None = None) -> None:
        """Refuse the cache unless it holds this run's training sequences, T, tokenizer, KD rows and (for the cosine
        term) hidden states."""
        m = self.manifest
        check_manifest(m, self.path, "mlm", objective.temperature, seqs.fingerprint(),
                       tokenizer_fingerprint(tokenizer), teacher)  # fmt: skip
        want = "masked" if objective.kd_masked_only else "all"
        if objective.kd_weight > 0 and m["kd_rows"] != want:
            flag = "with" if m["kd_rows"] == "masked" else "without"
            raise ValueError(
                f"--teacher-cache {self.path} holds the teacher's rows at {m['kd_rows']} positions, this run takes KD "
                f"at {want} positions: run {flag} --restrict-ce-to-mask, or rebuild the cache to match"
            )
        if objective.alpha_cos > 0 and not m["hidden"]:
            raise ValueError(
                f"--teacher-cache {self.path} holds no hidden states, which the cosine term needs: pass --alpha-cos 0, "
                "or rebuild the cache with --hidden"
            )
        self.seqs = seqs

    def masked_counts(self, seq_ids: list[int], copy: int) -> list[int]:
        """The number of masked (chosen) positions of each sequence in copy `copy`: one byte per token read, none of
        the teacher's rows (a rank's share of a global batch's masked rows, `engine.teacher_cache_train`)."""
        out = []
        for i in seq_ids:
            a = self._shards[copy * self.per_copy + i // self.unit]
            u = i % self.unit
            t0, t1 = int(a["token_offsets"][u]), int(a["token_offsets"][u + 1])
            out.append(int(np.count_nonzero(a["chosen"][t0:t1])))
        return out

    def batch(self, seq_ids: list[int], copy: int, pad_id: int, multiple_of: int = 8) -> "CachedBatch":
        from engine.batching import pad_to_multiple

        m = self.manifest
        masked, originals, chosen, values, indices, lse, hidden = [], [], [], [], [], [], []
        for i in seq_ids:
            a = self._shards[copy * self.per_copy + i // self.unit]
            u = i % self.unit
            t0, t1 = int(a["token_offsets"][u]), int(a["token_offsets"][u + 1])
            r0, r1 = int(a["row_offsets"][u]), int(a["row_offsets"][u + 1])
            masked.append(a["masked_ids"][t0:t1].tolist())
            originals.append(self.seqs[i].tolist())
            chosen.append(torch.from_numpy(a["chosen"][t0:t1].astype(np.bool_)))  # a copy: the map is read-only
            values.append(torch.from_numpy(np.array(a["values"][r0:r1])))
            lse.append(torch.from_numpy(np.array(a["lse"][r0:r1])))
            if not m["dense"]:
                indices.append(torch.from_numpy(np.array(a["indices"][r0:r1])))
            if m["hidden"]:
                hidden.append(torch.from_numpy(np.array(a["hidden"][t0:t1])).view(torch.bfloat16))
        ids, attn = pad_to_multiple(masked, pad_id, multiple_of)
        orig, _ = pad_to_multiple(originals, pad_id, multiple_of)
        picked = torch.zeros_like(attn, dtype=torch.bool)
        for r, c in enumerate(chosen):
            picked[r, : len(c)] = c
        labels = torch.where(picked, orig, -100)
        rows = attn.reshape(-1).nonzero().squeeze(1)  # (N,) non-pad positions, row-major: the cache's token order
        masked_rows = (labels.reshape(-1)[rows] != -100).nonzero().squeeze(1)  # among the N packed rows
        kd_rows = masked_rows if m["kd_rows"] == "masked" else torch.arange(rows.numel())
        values = torch.cat(values)
        ids_k = torch.cat(indices) if indices else torch.arange(values.shape[1], dtype=torch.int32).expand(values.shape)
        return CachedBatch(ids, attn, labels, rows, kd_rows, masked_rows, values, ids_k, torch.cat(lse),
                           torch.cat(hidden) if hidden else None)  # fmt: skip


@dataclass
class CachedBatch:
    """A pretraining batch from a teacher cache: the stored masked copy and the teacher's rows (CPU tensors)."""

    input_ids: torch.Tensor  # (B, L) int64 masked ids, as the teacher saw them
    attention_mask: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B, L) int64 original ids at the chosen positions, −100 elsewhere
    rows: torch.Tensor  # (N,) int64 flat indices of the non-pad positions
    kd_rows: torch.Tensor  # (R,) int64 the KD rows among the N packed rows (the cache's rows, in order)
    masked_rows: torch.Tensor  # (M,) int64 the chosen rows among the N packed rows
    values: torch.Tensor  # (R, K) fp32 teacher top-K logits
    indices: torch.Tensor  # (R, K) int32 their vocabulary ids
    lse: torch.Tensor  # (R,) fp32 teacher log-sum-exp at T
    hidden: torch.Tensor | None  # (N, H) bf16 teacher last hidden states of the non-pad rows, or None

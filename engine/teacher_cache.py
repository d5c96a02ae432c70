"""Teacher caches: run the teacher once (`distill cache-teacher`), then distill from its stored outputs with no teacher
in memory (`distill task --teacher-cache`, `distill pretrain --teacher-cache`).

What a cache holds, per row (one logit vector of the teacher):
    the teacher's K largest logits t_k and their ids i_k, and L = logsumexp(t/T) over its whole row,
so that the kept probabilities q_k = exp(t_k/T − L) are exact and the tail mass 1 − Σ q_k is known; training runs
`kernels.sparse_distill_loss` (KL over the K ids plus the tail as one bucket). Rows are
    classification  one per training example over the C classes; K ≥ C stores the whole row (no ids: "dense"),
    qa              two per training window (start, end) over its positions, always whole (pads −inf),
    mlm             one per KD position of each of `mask_copies` masked copies of every training sequence,
so classification, QA and a vocabulary ≤ K give exactly the live teacher's loss (the equality tests hold them to
1e-5 in fp32). Optionally (`--hidden`) the teacher's last hidden states of every real token (bf16) for the cosine term.

Pretraining masks tokens dynamically, afresh every batch; a cache cannot follow that. It stores instead the teacher's
outputs on C fixed masked copies of each sequence (BERT's static masking, C = 10 in the original BERT) and training
from it cycles through them: epoch e shows copy e mod C. The masked ids and which tokens were chosen are stored with
the outputs, so the student sees exactly the inputs the teacher saw. The report says "static masking, C copies".

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
(pretraining) KD rows and hidden states do not match the run. Writing is resumable (finished shards are kept) and, under
torchrun, shared: rank r writes shards r, r + W, ...; rank 0 writes the manifest.
"""

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from engine import distributed
from engine.atomic import atomic_write, write_json
from kernels import SparseTargets, sparse_targets

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


def _teacher_summary(path: Path, model) -> dict:
    from engine.model import count_parameters

    c = model.config
    return {
        "path": str(Path(path).resolve()),
        "fingerprint": teacher_fingerprint(path),
        "arch": c.arch,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "parameters": count_parameters(model),
    }


def _copy_teacher_files(teacher_dir: Path, cache: Path) -> None:
    dst = cache / TEACHER_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for name in TEACHER_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy(teacher_dir / name, dst / name)


def _prepare_folder(cache: Path, record: dict, overwrite: bool) -> bool:
    """Start, resume or refuse a cache folder; True when a finished cache with these options is already there."""
    if cache.exists() and not cache.is_dir():
        raise ValueError(f"--out {cache} is a file, not a folder")
    if cache.is_dir() and any(cache.iterdir()):
        old = json.loads((cache / RECORD).read_text()) if (cache / RECORD).is_file() else None
        if overwrite and (old is not None or (cache / MANIFEST).is_file()):
            shutil.rmtree(cache)
        elif old is None:
            raise ValueError(
                f"--out {cache} is not empty and holds no teacher cache: choose another folder (nothing was written)"
            )
        elif old != record:
            changed = sorted(
                "--" + k.replace("_", "-")
                for section in set(old) | set(record)
                for k in set(old.get(section, {})) | set(record.get(section, {}))
                if old.get(section, {}).get(k) != record.get(section, {}).get(k)
            )
            raise ValueError(
                f"--out {cache} holds a teacher cache made with other options ({', '.join(changed)}): pass --overwrite "
                "to replace it, or another --out"
            )
        elif (cache / MANIFEST).is_file():
            return True
    cache.mkdir(parents=True, exist_ok=True)
    write_json(cache / RECORD, record)
    return False


# ---- task caches (classification, QA) --------------------------------------------------------------------------------


class ClassifierTargets(NamedTuple):
    logits: SparseTargets  # (B, K) rows over the classes


class QATargets(NamedTuple):
    start_logits: SparseTargets  # (B, L) rows over the batch's positions (pads −inf)
    end_logits: SparseTargets


def _task_rows(task: str, out, batches: list[dict], k: int, temperature: float, width: int) -> dict[str, np.ndarray]:
    """Arrays of one shard from the teacher's outputs (`engine.evaluate.predict`) on its batches."""
    if task == "classification":
        t = sparse_targets(out, k, temperature)
        arrays = {"values": t.values.numpy(), "lse": t.lse.numpy()}
        if k < out.shape[1]:
            arrays["indices"] = t.indices.numpy()
        return arrays
    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).tolist()
    arrays = {}
    for name, rows in zip(("start", "end"), out):
        values = torch.full((len(rows), width), -math.inf)
        for r, (row, n) in enumerate(zip(rows, lengths)):
            values[r, :n] = row[:n]
        arrays[f"{name}_values"] = values.numpy()
        arrays[f"{name}_lse"] = torch.logsumexp(values / temperature, dim=-1).numpy()
    return arrays


def write_task_cache(cache: Path, task: str, td, teacher, teacher_dir: Path, k: int, temperature: float,
                     batch_size: int, shard_batches: int, device, precision, data, progress=True) -> dict:  # fmt: skip
    """Run the teacher once over every training row of `td` (a `TaskData`) and write the shards and the manifest.

    Returns the manifest."""
    from engine.evaluate import evaluate_model, predict

    batches = list(td.train_in_order(batch_size))
    n_shards = math.ceil(len(batches) / shard_batches)
    width = max(b["input_ids"].shape[1] for b in batches)
    mine = [j for j in range(n_shards) if j % distributed.world_size() == distributed.rank()]
    todo = [j for j in mine if not shard_done(cache, j)]
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc="teacher cache")
    t0 = time.perf_counter()
    for j in todo:
        part = batches[j * shard_batches : (j + 1) * shard_batches]
        out, _ = predict(teacher, part, device, precision)
        arrays = _task_rows(task, out, part, k, temperature, width)
        write_shard(cache, j, arrays, {"units": sum(len(b["input_ids"]) for b in part)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    distributed.barrier()

    def manifest() -> dict:
        n_classes = len(td.label2id) if task == "classification" else None
        kept = min(k, n_classes) if task == "classification" else width
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        m = {
            "format": FORMAT,
            "version": VERSION,
            "task": task,
            "temperature": temperature,
            "top_k": kept,
            "dense": task == "qa" or kept == n_classes,
            "width": n_classes if task == "classification" else width,
            "teacher": _teacher_summary(teacher_dir, teacher),
            "tokenizer": tokenizer_fingerprint(td.tokenizer),
            "data": rows_fingerprint(batches),
            "eval_data": rows_fingerprint(td.eval.batches),
            "teacher_metrics": evaluate_model(teacher, td.eval, device, precision, data),
            "units": sum(len(b["input_ids"]) for b in batches),
            "shards": n_shards,
            "shard_units": shard_batches * batch_size,
            "tokens": tokens,
            "bytes": cache_bytes(cache),
            "seconds": round(seconds, 2),
        }
        if td.label2id is not None:
            m["labels"] = sorted(td.label2id, key=td.label2id.get)
        if not m["dense"]:  # the teacher's mean mass outside its top K (small arrays: read back whole)
            shards = _open_shards(cache, n_shards)
            values = torch.from_numpy(np.concatenate([a["values"] for a in shards]))
            lse = torch.from_numpy(np.concatenate([a["lse"] for a in shards]))
            tail = (1 - torch.exp(values / temperature - lse[:, None]).sum(1)).clamp_min(0)
            m["tail_mass_mean"] = round(tail.mean().item(), 5)
        m["bytes_per_token"] = round(m["bytes"] / max(tokens, 1), 2)
        write_json(cache / MANIFEST, m)
        return m

    return distributed.run_on_main(manifest)


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


def _mlm_generator(seed: int, copy: int, part: int, device) -> torch.Generator:
    digest = hashlib.sha256(f"teacher-cache/{seed}/{copy}/{part}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@torch.no_grad()
def _mlm_shard(teacher, seqs, first: int, last: int, corpus, masking, k: int, temperature: float, kd_masked: bool,
               hidden: bool, batch_size: int, generator, device, precision, row_chunk: int = 1024) -> dict:  # fmt: skip
    """Masked copies of sequences [first, last) and the teacher's outputs on them, as a shard's arrays."""
    from engine.batching import pad_to_multiple
    from engine.loop import autocast
    from engine.masking import mask_tokens

    keys = ("masked_ids", "chosen", "values", "indices", "lse", "hidden", "n_tokens", "n_rows")
    parts = {key: [] for key in keys}
    tail = 0.0  # Σ over rows of the teacher's mass outside its top K (what the KD term sees only as one bucket)
    vocab = teacher.config.vocab_size
    for b0 in range(first, last, batch_size):
        idx = range(b0, min(b0 + batch_size, last))
        ids, attn = pad_to_multiple([seqs[i].tolist() for i in idx], corpus.tokenizer.pad_token_id)
        ids, attn = ids.to(device), attn.to(device)
        masked, labels = mask_tokens(
            ids, attn, corpus.special_ids, corpus.tokenizer.mask_token_id, vocab,
            mlm_probability=masking.mlm_probability, mask_replace=masking.mask_replace,
            random_replace=masking.random_replace, token_weights=corpus.token_weights, generator=generator,
        )  # fmt: skip
        real = attn.bool().reshape(-1)
        chosen = (labels != -100).reshape(-1)
        with autocast(device, precision):
            h = teacher.encoder(masked, attn).last_hidden_state.flatten(0, 1)  # (B·L, H)
        kd = (chosen if kd_masked else real).nonzero().squeeze(1)
        for c0 in range(0, kd.numel(), row_chunk):
            with autocast(device, precision):
                logits = teacher.lm_head(h.index_select(0, kd[c0 : c0 + row_chunk]))  # (R, V)
            t = sparse_targets(logits.float(), k, temperature)
            if k < vocab:
                tail += float((1 - torch.exp(t.values / temperature - t.lse[:, None]).sum(1)).clamp_min(0).sum())
            parts["values"].append(t.values.cpu())
            parts["lse"].append(t.lse.cpu())
            if k < vocab:
                parts["indices"].append(t.indices.cpu())
        flat = real.nonzero().squeeze(1)
        parts["masked_ids"].append(masked.reshape(-1)[flat].to(torch.int32).cpu())
        parts["chosen"].append(chosen[flat].to(torch.uint8).cpu())
        if hidden:
            parts["hidden"].append(h.index_select(0, flat).to(torch.bfloat16).view(torch.int16).cpu())
        per_seq = attn.sum(1).cpu()
        parts["n_tokens"].append(per_seq)
        parts["n_rows"].append((labels != -100).sum(1).cpu() if kd_masked else per_seq)
    arrays = {}
    for key in ("masked_ids", "chosen", "values", "indices", "lse", "hidden"):
        if parts[key]:
            arrays[key] = torch.cat(parts[key]).numpy()
    for key, name in (("n_tokens", "token_offsets"), ("n_rows", "row_offsets")):
        counts = torch.cat(parts[key]).to(torch.int64)
        arrays[name] = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).numpy()
    return arrays, tail


def write_mlm_cache(cache: Path, teacher, teacher_dir: Path, corpus, masking, k: int, temperature: float, copies: int,
                    kd_masked: bool, hidden: bool, batch_size: int, shard_units: int, seed: int, device, precision,
                    progress: bool = True) -> dict:  # fmt: skip
    """The teacher's outputs on `copies` masked copies of every training sequence of `corpus` (`pretrain.Corpus`)."""
    seqs = TrainSequences(corpus.batches)
    n = len(seqs)
    per_copy = math.ceil(n / shard_units)
    n_shards = copies * per_copy
    mine = [j for j in range(n_shards) if j % distributed.world_size() == distributed.rank()]
    todo = [j for j in mine if not shard_done(cache, j)]
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc="teacher cache")
    t0 = time.perf_counter()
    teacher.eval()
    for j in todo:
        c, part = divmod(j, per_copy)
        first, last = part * shard_units, min(n, (part + 1) * shard_units)
        gen = _mlm_generator(seed, c, part, device)
        arrays, tail = _mlm_shard(teacher, seqs, first, last, corpus, masking, k, temperature, kd_masked, hidden,
                                  batch_size, gen, device, precision)  # fmt: skip
        summary = {"units": last - first, "rows": int(arrays["row_offsets"][-1]), "tail_mass_sum": tail}
        write_shard(cache, j, arrays, summary)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    distributed.barrier()

    def manifest() -> dict:
        vocab = teacher.config.vocab_size
        summaries = [json.loads(_summary_path(cache, j).read_text()) for j in range(n_shards)]
        rows = sum(x["rows"] for x in summaries)
        tokens = copies * int(seqs.lengths.sum())
        m = {
            "format": FORMAT,
            "version": VERSION,
            "task": "mlm",
            "temperature": temperature,
            "top_k": min(k, vocab),
            "dense": k >= vocab,
            "width": vocab,
            "teacher": _teacher_summary(teacher_dir, teacher),
            "tokenizer": tokenizer_fingerprint(corpus.tokenizer),
            "data": seqs.fingerprint(),
            "mask_copies": copies,
            "kd_rows": "masked" if kd_masked else "all",
            "hidden": hidden,
            "hidden_size": teacher.config.hidden_size,
            "masking": {f.name: getattr(masking, f.name) for f in fields(masking)},
            "seed": seed,
            "units": copies * n,
            "sequences": n,
            "shards": n_shards,
            "shard_units": shard_units,
            "rows": rows,
            "tail_mass_mean": round(sum(x["tail_mass_sum"] for x in summaries) / max(rows, 1), 5),
            "tokens": tokens,
            "bytes": cache_bytes(cache),
            "seconds": round(seconds, 2),
        }
        m["bytes_per_token"] = round(m["bytes"] / max(tokens, 1), 2)
        write_json(cache / MANIFEST, m)
        return m

    return distributed.run_on_main(manifest)


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


def cached_triple_loss(s_rows, labels, b: CachedBatch, head, o) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilBERT's triple loss (`engine.objectives.triple_loss`) against a teacher cache on packed rows: the KD term
    on the stored top-K + tail targets (`kernels.sparse_distill_loss`, with the MLM CE in the same pass), the cosine
    term on stored hidden states. The student's vocabulary projection is materialized for the KD rows ([R, V]: the
    fused head takes a teacher's hidden states, which a top-K cache does not hold).

    Args: s_rows (N, H) student hidden states of the non-pad rows; labels (N,) their MLM labels (−100: not masked);
    b the batch (on the device); head the student's MLM head; o the ObjectiveOptions.
    """
    from kernels import cosine_loss, cross_entropy, sparse_distill_loss

    zero = s_rows.new_zeros((), dtype=torch.float32)
    terms = {"kd": zero, "mlm": zero, "cos": zero}
    loss = zero
    if o.kd_weight > 0 or o.alpha_mlm > 0:
        sel = b.kd_rows if o.kd_weight > 0 else b.masked_rows
        z = head.transform(s_rows.index_select(0, sel))  # (R, H)
        logits = torch.nn.functional.linear(z, head.decoder.weight, head.decoder.bias)  # (R, V)
        y = labels.index_select(0, sel)
        if o.kd_weight > 0:
            y_ce = y if o.alpha_mlm > 0 else None
            out = sparse_distill_loss(logits, b.values, b.indices, b.lse, labels=y_ce, temperature=o.temperature,
                                      kd_weight=o.kd_weight, ce_weight=o.alpha_mlm)  # fmt: skip
            loss = loss + out.loss
            terms["kd"], terms["mlm"] = out.kd.detach(), out.ce.detach()
        else:
            ce = cross_entropy(logits, y)
            loss = loss + o.alpha_mlm * ce
            terms["mlm"] = ce.detach()
    if o.alpha_cos > 0:
        cos = cosine_loss(s_rows, b.hidden.to(s_rows.dtype))
        loss = loss + o.alpha_cos * cos
        terms["cos"] = cos.detach()
    return loss, terms


class CachedPretrainObjective:
    """`engine.objectives.PretrainObjective` with a teacher cache in place of the teacher (and of dynamic masking)."""

    def __init__(self, student, opts, device):
        from engine.objectives import check_objective_options

        check_objective_options(opts)
        self.student, self.opts, self.device = student, opts, device

    def __call__(self, batch: CachedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from engine.batching import to_device

        b = to_device(batch, self.device)
        h = self.student.encoder(b.input_ids, b.attention_mask).last_hidden_state  # (B, L, H)
        s_rows = h.flatten(0, 1).index_select(0, b.rows)  # (N, H)
        labels = b.labels.reshape(-1).index_select(0, b.rows)  # (N,)
        return cached_triple_loss(s_rows, labels, b, self.student.lm_head, self.opts)


def cached_batches(batches, cache: MLMTeacherCache):
    """The training batches `batches` (`engine.batching.LengthGroupedBatches` over the split) with `CachedBatch`es
    of the cache's masked copy (epoch mod copies) in place of fresh ones: the same order, resumable the same way."""

    class CachedCorpusBatches(type(batches)):
        def _collate(self, idx: torch.Tensor) -> CachedBatch:  # idx: positions in the training split
            return cache.batch(idx.tolist(), self.epoch % cache.copies, self.pad_id, self.pad_to_multiple)

    out = CachedCorpusBatches.__new__(CachedCorpusBatches)
    out.__dict__.update(batches.__dict__)
    return out


# ---- the command -----------------------------------------------------------------------------------------------------


def cache_teacher(opts, data, masking, run) -> dict:
    """`distill cache-teacher`: run `opts.teacher` once over the training data and write a cache to `run.out`.

    Args: CacheTeacherOptions, TaskDataOptions (for mlm: --data, --text-column, --max-seq-len, --batch-size),
    MaskingOptions (mlm), RunOptions (--out is the cache folder; --seed must be the training run's: it decides the
    held-out split of pretraining; --overwrite replaces a cache made with other options).
    Returns the manifest.
    """
    from engine.options import DataOptions, check_ranges, to_dict
    from engine.runs import check_lengths, load_frozen, setup, skip_input_checks

    task = opts.task
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if not opts.teacher:
        raise ValueError("--teacher is required: the checkpoint whose outputs the cache keeps")
    check_ranges(opts, data, masking, run)
    if not (math.isfinite(opts.temperature) and opts.temperature > 0):
        raise ValueError(f"--temperature must be > 0, got {opts.temperature}")
    teacher_dir = Path(opts.teacher)
    device, precision = setup(run)
    from engine.config import ModelConfig

    ModelConfig.from_pretrained(teacher_dir)  # a clear error for a wrong path before any work
    record = {**to_dict(opts, data, masking), "run": {"seed": run.seed, "precision": precision}}
    cache = Path(run.out)
    finished = distributed.run_on_main(lambda: _prepare_folder(cache, record, run.overwrite))
    if finished:
        print(f"teacher cache {cache} is complete already (same options); nothing to do")
        return read_manifest(cache)
    distributed.run_on_main(lambda: _copy_teacher_files(teacher_dir, cache), share_result=False)
    t0 = time.perf_counter()
    if task in ("classification", "qa"):
        from engine.taskdata import HEAD_KEY, has_task_head, prepare_task_data, seq_len, teacher_label_map

        if not has_task_head(teacher_dir, task):
            raise ValueError(
                f"teacher {teacher_dir} has no {task} head ({HEAD_KEY[task]} is not in its weights): fine-tune it "
                f"first with `distill finetune --task {task} --model {teacher_dir}`"
            )
        label2id_of = (lambda ours: teacher_label_map(teacher_dir, ours)) if task == "classification" else None
        td = prepare_task_data(task, data, teacher_dir, run.seed, label2id_of)
        teacher = load_frozen(teacher_dir, task, device, precision, label2id=td.label2id)
        check_lengths(seq_len(data, task), td.tokenizer, teacher)
        skip_input_checks(teacher)
        shard_batches = max(1, opts.shard_size // data.batch_size)
        m = write_task_cache(cache, task, td, teacher, teacher_dir, opts.top_k, opts.temperature, data.batch_size,
                             shard_batches, device, precision, data, run.progress)  # fmt: skip
    else:
        from engine.corpus import load_tokenizer
        from engine.pretrain import prepare_corpus

        if not data.data:
            raise ValueError("--data is required: the pretraining texts (the same as the `distill pretrain` run's)")
        teacher = load_frozen(teacher_dir, "mlm", device, precision)
        tokenizer = load_tokenizer(teacher_dir)
        corpus_opts = DataOptions(
            data=list(data.data), text_column=data.text_column, max_seq_len=data.max_seq_len or 128,
            min_seq_len=opts.min_seq_len, heldout_fraction=opts.heldout_fraction, batch_size=data.batch_size,
            cache_dir=str(cache / "tokens"),
        )  # fmt: skip
        check_lengths(corpus_opts.max_seq_len, tokenizer, teacher)
        skip_input_checks(teacher)
        corpus = prepare_corpus(tokenizer, corpus_opts, masking, run, cache, teacher.config.vocab_size, device)
        units = max(opts.shard_size // data.batch_size, 1) * data.batch_size
        m = write_mlm_cache(cache, teacher, teacher_dir, corpus, masking, opts.top_k, opts.temperature,
                            opts.mask_copies, opts.restrict_ce_to_mask, opts.hidden, data.batch_size, units, run.seed,
                            device, precision, run.progress)  # fmt: skip
    what = f"{m['units']} {'examples' if task == 'classification' else 'windows' if task == 'qa' else 'copies'}"
    print(
        f"teacher cache {cache}: {what}, K = {m['top_k']}{' (whole rows)' if m['dense'] else ''}, T = "
        f"{m['temperature']:g}; {m['bytes'] / 2**20:.1f} MiB, {m['bytes_per_token']:.1f} bytes per token; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    if m.get("tail_mass_mean", 0) > 0.1:  # the KD term sees that much of the teacher only as one bucket
        print(
            f"note: the teacher's top {m['top_k']} hold {100 * (1 - m['tail_mass_mean']):.1f}% of its probability "
            f"at T = {m['temperature']:g} on average; the rest is one bucket, so the KD term is a loose lower bound "
            "of the exact one (a larger --top-k, a lower --temperature, or the live teacher keeps more)"
        )
    return m


def pretrain_from_cache(model_opts, data, masking, objective, optim, run) -> dict:
    """`distill pretrain --teacher-cache`: the DistilBERT triple loss against a pretraining cache, no teacher in
    memory; masking is the cache's (static, `mask_copies` fixed copies cycled through by epoch), and the report says
    so. Called by `engine.pretrain.pretrain` (inside its run-folder guard) with the same options."""
    from engine import checkpoint as ckpt
    from engine.config import ModelConfig
    from engine.corpus import load_texts, load_tokenizer
    from engine.evaluate import evaluate_mlm
    from engine.loop import train
    from engine.model import count_parameters
    from engine.objectives import check_objective_options
    from engine.options import check_ranges, to_dict
    from engine.pretrain import LOSS_KEYS, prepare_corpus
    from engine.report import format_table
    from engine.runs import (
        check_lengths,
        check_out_dir,
        describe,
        interrupted,
        loss_summary,
        prepare_out_dir,
        release_replaced,
        save_model,
        setup,
        skip_input_checks,
        student_checkpoint,
    )

    device, precision = setup(run)
    if distributed.world_size() > 1:
        raise ValueError("pretraining from a teacher cache runs in one process: launch it without torchrun")
    if not data.data:
        raise ValueError("--data is required: the texts the cache was made from")
    check_ranges(data, masking, objective, optim, run)
    check_objective_options(objective, masking)
    cache = MLMTeacherCache(model_opts.teacher_cache)
    m = cache.manifest
    record = to_dict(model_opts, data, masking, objective, optim, run)
    check_out_dir(run, record)
    teacher_dir = Path(model_opts.teacher or cache.teacher_path)
    if not (teacher_dir / "config.json").is_file() and not model_opts.student:
        raise ValueError(
            f"the teacher the cache was made with ({teacher_dir}) is gone, and the student is made from its layers by "
            "default: give --student (or --teacher, the same checkpoint elsewhere)"
        )
    tokenizer = load_tokenizer(cache.tokenizer_dir)
    student_cfg = [ModelConfig.from_pretrained(model_opts.student)] if model_opts.student else []
    check_lengths(data.max_seq_len, tokenizer, cache.config, *student_cfg)
    texts = load_texts(data.data, text_column=data.text_column)
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    student_dir = student_checkpoint(model_opts.student, teacher_dir, out, model_opts.student_arch,
                                     model_opts.student_num_layers, model_opts.student_layers)  # fmt: skip
    student = ckpt.load_model(student_dir, head="mlm", device=device)[0]
    if student.config.vocab_size != m["teacher"]["vocab_size"]:
        raise ValueError(
            f"vocabulary mismatch: the cache's teacher has {m['teacher']['vocab_size']} tokens, the student "
            f"{student.config.vocab_size}; the student must use the teacher's tokenizer"
        )
    corpus = prepare_corpus(tokenizer, data, masking, run, out, student.config.vocab_size, device, texts)
    cache.check(TrainSequences(corpus.batches), objective, tokenizer, model_opts.teacher or None)
    skip_input_checks(student)
    batches = cached_batches(corpus.batches, cache)
    objective_fn = CachedPretrainObjective(student, objective, device)
    static = f"static masking: {m['mask_copies']} fixed masked copies per sequence from the teacher cache"
    print(
        f"teacher cache {cache.path} (K = {m['top_k']}, T = {m['temperature']:g}, {static}) -> student {student_dir} "
        f"({describe(student)}); {corpus.n_train} train / {corpus.n_heldout} held-out sequences; {device} {precision}"
    )
    mask_id = tokenizer.mask_token_id

    def evaluate(step):
        return evaluate_mlm({"student": student}, corpus.eval_batches, corpus.special_ids, mask_id, masking, device,
                            precision)  # fmt: skip

    t0 = time.perf_counter()
    resume = run.resume and (out / "checkpoint" / "trainer_state.pt").is_file()  # a start without one is afresh
    result = train(
        student, objective_fn, batches, optim, replace(run, resume=resume), out, device, precision,
        tokenizer_dir=cache.tokenizer_dir, evaluate=evaluate, tokens_in=lambda b: b.attention_mask.sum(),
        options_record=record, on_save=lambda step: release_replaced(out),
    )  # fmt: skip
    if result.interrupted:
        return interrupted(result.step, out)
    final = evaluate(result.step)
    save_model(student, out / "student", cache.tokenizer_dir)
    report = {
        "teacher": {"path": m["teacher"]["path"], "parameters": m["teacher"]["parameters"], "from_cache": True},
        "student": {"path": str(out / "student"), "parameters": count_parameters(student), **final["student"]},
        "teacher_cache": {"path": str(cache.path), "masking": static, "tail_mass_mean": m.get("tail_mass_mean"),
                          **{k: m[k] for k in ("top_k", "dense", "temperature", "mask_copies", "kd_rows", "hidden",
                                               "bytes", "bytes_per_token")}},
        "heldout_masked_tokens": final["masked_tokens"],
        "steps": result.step,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "precision": precision,
        **loss_summary(out / "metrics.jsonl", out / "loss_curve.png", LOSS_KEYS),
    }  # fmt: skip
    distributed.run_on_main(lambda: write_json(out / "report.json", report), share_result=False)
    s = report["student"]
    row = ("student", f"{s['parameters'] / 1e6:.1f}M", f"{100 * s['mlm_accuracy']:.2f}", f"{s['perplexity']:.2f}")
    print(format_table([row], ("model", "params", "held-out MLM acc %", "perplexity")))
    print(f"{static}; loss {report['first_loss']} -> {report['last_loss']} in {report['steps']} steps")
    print(f"report: {out / 'report.json'}")
    return report

"""Writing a teacher cache: `distill cache-teacher` runs the teacher once over the training data and stores its
outputs (`engine.teacher_cache_store` defines the format).

Writing is resumable (finished shards are kept) and, under torchrun, shared: rank r writes shards r, r + W, ...;
rank 0 writes the manifest.
"""

import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from engine import distributed
from engine.atomic import write_json
from engine.teacher_cache_store import (
    FORMAT,
    MANIFEST,
    RECORD,
    TASKS,
    TEACHER_DIR,
    TEACHER_FILES,
    VERSION,
    TrainSequences,
    _open_shards,
    _summary_path,
    cache_bytes,
    read_manifest,
    rows_fingerprint,
    shard_done,
    teacher_fingerprint,
    tokenizer_fingerprint,
    write_shard,
)
from kernels import sparse_targets

# ---- the cache folder ------------------------------------------------------------------------------------------------


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


def _my_shards(cache: Path, n_shards: int, progress: bool) -> Iterator[int]:
    """This rank's unfinished shards (rank r writes shards r, r + W, ...: finished ones are kept), with a progress bar
    over all of its shards on the main rank that counts each one as the loop body returns."""
    mine = [j for j in range(n_shards) if j % distributed.world_size() == distributed.rank()]
    todo = [j for j in mine if not shard_done(cache, j)]
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc="teacher cache")
    for j in todo:
        yield j
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


# ---- task caches (classification, QA) --------------------------------------------------------------------------------


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
    t0 = time.perf_counter()
    for j in _my_shards(cache, n_shards, progress):
        part = batches[j * shard_batches : (j + 1) * shard_batches]
        out, _ = predict(teacher, part, device, precision)
        arrays = _task_rows(task, out, part, k, temperature, width)
        write_shard(cache, j, arrays, {"units": sum(len(b["input_ids"]) for b in part)})
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
    t0 = time.perf_counter()
    teacher.eval()
    for j in _my_shards(cache, n_shards, progress):
        c, part = divmod(j, per_copy)
        first, last = part * shard_units, min(n, (part + 1) * shard_units)
        gen = _mlm_generator(seed, c, part, device)
        arrays, tail = _mlm_shard(teacher, seqs, first, last, corpus, masking, k, temperature, kd_masked, hidden,
                                  batch_size, gen, device, precision)  # fmt: skip
        summary = {"units": last - first, "rows": int(arrays["row_offsets"][-1]), "tail_mass_sum": tail}
        write_shard(cache, j, arrays, summary)
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


# ---- the command -----------------------------------------------------------------------------------------------------


def cache_teacher(opts, data, masking, run) -> dict:
    """`distill cache-teacher`: run `opts.teacher` once over the training data and write a cache to `run.out`.

    Args: CacheTeacherOptions, TaskDataOptions (for mlm: --data, --text-column, --max-seq-len, --batch-size),
    MaskingOptions (mlm), RunOptions (--out is the cache folder; --seed must be the training run's: it decides the
    held-out split of pretraining; --overwrite replaces a cache made with other options).
    Returns the manifest.
    """
    from engine.options import DataOptions, check_fsdp, check_ranges, to_dict
    from engine.runs import check_lengths, load_frozen, setup, skip_input_checks

    task = opts.task
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if not opts.teacher:
        raise ValueError("--teacher is required: the checkpoint whose outputs the cache keeps")
    check_ranges(opts, data, masking, run)
    check_fsdp(run, "cache-teacher")
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

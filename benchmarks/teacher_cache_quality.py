"""How close K = 64 of V = 30522 comes to exact KD: `python -m benchmarks.teacher_cache_quality [--train]`.

On the bundled pretraining default (MiniLM teacher with its trained MLM head, BBC News, 64 tokens, KD on the masked
positions as `DEMO_PRETRAIN` sets): the held-out batches are masked with a fixed generator, and on every masked row
the KD term T²·KL of a student (a 3-layer student made from the teacher's layers, as the demo starts from) is
computed twice: exactly (`kernels.kd_ce_rows` on the teacher's full logits) and from the top-K + tail targets a cache
stores (`kernels.sparse_kd_ce_rows`), for each K of `--k` and T of `--temperature`. Reported: both means, the top-K
value as a share of the exact one, the per-row differences, the teacher's entropy and its mean tail mass outside its
top K. The sparse KL is a lower bound of the exact one (bucketing the tail loses only the tail's shape), so the
difference is one-signed; it is small only when the teacher's top K hold most of its mass.

With `--train`, also the acceptance run: `distill pretrain` on the demo profile with the live teacher (dynamic masking)
and from a K = 64 cache (static masking, `--mask-copies`), the same steps and seed, and the held-out MLM accuracy of
each student. Writes `benchmarks/results/teacher-cache-quality.json` (or `--out`).
"""

import argparse
import json
import math
from pathlib import Path

import torch


def heldout_kd(ks: list[int], temperatures: list[float], batches: int) -> list[dict]:
    from engine import defaults
    from engine.corpus import load_tokenizer
    from engine.masking import mask_tokens
    from engine.options import DataOptions, MaskingOptions, RunOptions
    from engine.pretrain import bundled_teacher, prepare_corpus
    from engine.runs import load_frozen
    from engine.student import init_student
    from kernels import kd_ce_rows, sparse_kd_ce_rows, sparse_targets

    d = defaults.DEMO_PRETRAIN
    run = RunOptions(out="runs/teacher-cache-quality", progress=False, eval_batches=batches)
    teacher_dir = bundled_teacher(run)
    device = torch.device("cpu")
    teacher = load_frozen(teacher_dir, "mlm", device, "fp32")
    student_dir = Path(run.out) / "student_init"
    if not (student_dir / "config.json").is_file():
        init_student(teacher_dir, student_dir, num_layers=d["student_num_layers"])
    student = load_frozen(student_dir, "mlm", device, "fp32")
    tokenizer = load_tokenizer(teacher_dir)
    data = DataOptions(data=[str(defaults.bbc_news_dir())], max_seq_len=d["max_seq_len"], batch_size=d["batch_size"])
    masking = MaskingOptions(mlm_smoothing=d["mlm_smoothing"])
    corpus = prepare_corpus(tokenizer, data, masking, run, Path(run.out), teacher.config.vocab_size, device)
    gen = torch.Generator().manual_seed(1234)
    t_rows, s_rows = [], []
    with torch.no_grad():
        for ids, attn in corpus.eval_batches:
            masked, labels = mask_tokens(ids, attn, corpus.special_ids, tokenizer.mask_token_id,
                                         teacher.config.vocab_size, generator=gen)  # fmt: skip
            sel = (labels.reshape(-1) != -100).nonzero().squeeze(1)
            t_rows.append(teacher(masked, attn).logits.flatten(0, 1)[sel])  # (M, V)
            s_rows.append(student(masked, attn).logits.flatten(0, 1)[sel])
    t, s = torch.cat(t_rows), torch.cat(s_rows)
    out = []
    for temperature in temperatures:
        exact = kd_ce_rows(s, t, None, None, temperature, compute_grad=False)[0]
        log_q = torch.log_softmax(t / temperature, -1)
        entropy = -(log_q.exp() * log_q).sum(-1)
        for k in ks:
            tv, ti, lse = sparse_targets(t, k, temperature)
            sparse = sparse_kd_ce_rows(s, tv, ti, lse, None, None, temperature, compute_grad=False)[0]
            tail = 1 - torch.exp(tv / temperature - lse[:, None]).sum(1)
            diff = exact - sparse
            out.append({
                "rows": exact.numel(),
                "k": k,
                "temperature": temperature,
                "teacher_entropy_nats": round(entropy.mean().item(), 3),
                "uniform_entropy_nats": round(math.log(t.shape[1]), 3),
                "kd_exact_mean": round(exact.mean().item(), 5),
                "kd_topk_mean": round(sparse.mean().item(), 5),
                "topk_share_of_exact": round((sparse.mean() / exact.mean()).item(), 4),
                "row_difference_mean": round(diff.mean().item(), 5),
                "row_difference_max": round(diff.abs().max().item(), 5),
                "sparse_le_exact_rows": round((sparse <= exact + 1e-5).float().mean().item(), 5),
                "teacher_tail_mass_mean": round(tail.mean().item(), 5),
            })  # fmt: skip
            print(json.dumps(out[-1]))
    return out


def train_both(k: int, copies: int, steps: int) -> dict:
    from engine import defaults
    from engine.options import (
        PRETRAIN_SECTIONS,
        CacheTeacherOptions,
        MaskingOptions,
        RunOptions,
        TaskDataOptions,
        build_options,
    )
    from engine.pretrain import bundled_teacher, pretrain
    from engine.teacher_cache import cache_teacher

    d = defaults.DEMO_PRETRAIN
    bbc = [str(defaults.bbc_news_dir())]
    teacher = str(bundled_teacher(RunOptions(progress=False)))
    cache = "runs/teacher-cache-quality/teacher-cache"
    cache_teacher(
        CacheTeacherOptions(task="mlm", teacher=teacher, top_k=k, mask_copies=copies, restrict_ce_to_mask=True,
                            hidden=True),
        TaskDataOptions(data=bbc, max_seq_len=d["max_seq_len"], batch_size=d["batch_size"]),
        MaskingOptions(mlm_smoothing=d["mlm_smoothing"]), RunOptions(out=cache, progress=False),
    )  # fmt: skip
    out = {}
    for name, extra in (("live", {}), ("from-cache", {"teacher_cache": cache})):
        profile = {**d, "data": bbc, "teacher": teacher, "steps": steps, "progress": False, "overwrite": True,
                   "out": f"runs/teacher-cache-quality/{name}", **extra}  # fmt: skip
        report = pretrain(*build_options(argparse.Namespace(), *PRETRAIN_SECTIONS, profile=profile))
        out[name] = {"mlm_accuracy": report["student"]["mlm_accuracy"], "perplexity": report["student"]["perplexity"],
                     "train_seconds": report["train_seconds"], "last_loss": report["last_loss"]}  # fmt: skip
    out["accuracy_points_cache_minus_live"] = round(
        100 * (out["from-cache"]["mlm_accuracy"] - out["live"]["mlm_accuracy"]), 3
    )
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[64, 256, 1024, 4096])
    p.add_argument("--temperature", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--batches", type=int, default=20, help="held-out batches (0: all)")
    p.add_argument("--train", action="store_true", help="also the two pretraining runs (minutes of CPU)")
    p.add_argument("--mask-copies", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default="benchmarks/results/teacher-cache-quality.json")
    args = p.parse_args(argv)
    result = {"heldout_kd": heldout_kd(args.k, args.temperature, args.batches)}
    if args.train:
        result["training"] = train_both(args.k[0], args.mask_copies, args.steps)
        print(json.dumps(result["training"], indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

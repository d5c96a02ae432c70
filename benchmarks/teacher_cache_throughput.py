"""Teacher cache against the live teacher, side by side in one run: `python -m benchmarks.teacher_cache_throughput`.

On the bundled `distill task` default (MiniLM teacher fine-tuned on BBC News, 3-layer student from its layers,
batch 16, 128 tokens, the demo's learning rate): builds the cache once (`engine.teacher_cache.cache_teacher`, timed),
then takes training steps with the live teacher and with the cache in turns (step by step, on the same batches, so
that a CPU shared with other work slows both alike), and reports steps/s of each, their ratio, the cache's bytes per
token and the time the cache took to build. Each path repeats the loop's work: the task loss (student forward, teacher
forward or cache lookup, the KD+CE kernel), backward, clip, AdamW step. `--steps` steps each after `--warmup`.

Writes `benchmarks/results/teacher-cache-<device>.json` (or `--out`).
"""

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="runs/teacher-cache-bench", help="the cache folder (built if missing)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    from engine import defaults
    from engine.finetune import bundled_teacher
    from engine.objectives import TaskLoss
    from engine.options import CacheTeacherOptions, KDOptions, MaskingOptions, RunOptions, TaskDataOptions
    from engine.runs import load_frozen, load_task_model, skip_input_checks
    from engine.student import init_student
    from engine.taskdata import prepare_task_data, teacher_label_map
    from engine.teacher_cache import TaskTeacherCache, cache_teacher

    device = torch.device(args.device)
    d = defaults.DEMO_TASK
    bbc = [str(defaults.bbc_news_dir())]
    data = TaskDataOptions(data=bbc, batch_size=d["batch_size"], max_seq_len=d["max_seq_len"])
    run = RunOptions(out=args.cache, device=args.device, progress=False)
    teacher_dir = bundled_teacher(data, run)
    t0 = time.perf_counter()
    manifest = cache_teacher(CacheTeacherOptions(teacher=str(teacher_dir)), data, MaskingOptions(), run)
    build_s = time.perf_counter() - t0

    td = prepare_task_data("classification", data, teacher_dir, 0, lambda ours: teacher_label_map(teacher_dir, ours))
    cache = TaskTeacherCache(args.cache, "classification")
    cache.check(td, 2.0, teacher_dir)
    teacher = load_frozen(teacher_dir, "classification", device, "fp32", label2id=td.label2id)
    student_dir = Path(args.cache).parent / "teacher-cache-bench-student"
    if not (student_dir / "config.json").is_file():
        init_student(defaults.bundled_teacher_dir(), student_dir, num_layers=d["student_num_layers"])
    kd = KDOptions()
    models, losses, optims = {}, {}, {}
    for name, t in (("live", teacher), ("cache", cache)):
        torch.manual_seed(0)
        models[name] = load_task_model(student_dir, "classification", td.label2id, device)
        skip_input_checks(models[name])
        losses[name] = TaskLoss("classification", models[name], t, kd, device)
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=d["lr"])
    skip_input_checks(teacher)
    seconds = {"live": 0.0, "cache": 0.0}
    for i in range(args.warmup + args.steps):
        batch = td.train.next_batch()
        for name in ("live", "cache") if i % 2 == 0 else ("cache", "live"):  # alternate who goes first
            t = time.perf_counter()
            loss, _ = losses[name](batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            if i >= args.warmup:
                seconds[name] += time.perf_counter() - t
    rate = {k: args.steps / v for k, v in seconds.items()}
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "batch_size": d["batch_size"],
        "max_seq_len": d["max_seq_len"],
        "steps_per_s_live_teacher": round(rate["live"], 3),
        "steps_per_s_cache": round(rate["cache"], 3),
        "speedup": round(rate["cache"] / rate["live"], 3),
        "cache_bytes": manifest["bytes"],
        "cache_bytes_per_token": manifest["bytes_per_token"],
        "cache_top_k": manifest["top_k"],
        "cache_build_seconds": round(build_s, 1),
    }
    out = Path(args.out or f"benchmarks/results/teacher-cache-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

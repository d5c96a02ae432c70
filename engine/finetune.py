"""`distill finetune` and `distill task`: task-specific fine-tuning and distillation (classification, extractive QA).

Both commands run on the shared loop (`engine.loop.train`: checkpoints, resume, logging, mixed precision) with a
task head instead of the MLM head:

    finetune      L = CE(s, y)                                        (plain fine-tuning; this makes teachers)
    task          classification: L = α·CE(s, y) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))
                  QA: L = α_qa·½(CE_start + CE_end) + α_ce·½(KD_start + KD_end), pad positions excluded

The teacher is a fine-tuned checkpoint with the task's head (and, for classification, the data's label set); it is
frozen, in eval mode, run under no_grad. KD compares logits only, so the student may differ from the teacher in
depth and width: a DistilBERT made from teacher layers, any smaller BERT, or a narrower model.

Setup order of `distill task`: output-folder guard → teacher (head and labels checked) → data (label names mapped
to the teacher's ids; validation given or split off deterministically) → student → distillation → the same student
fine-tuned without a teacher (the baseline) → evaluation of all three → latency and throughput → report.
With no arguments, `distill task` runs that whole story on the bundled assets (BBC News, MiniLM teacher).

The pieces live elsewhere: options in `engine.options`, data in `engine.taskdata`, the loss in
`engine.objectives.TaskLoss`, evaluation and timing in `engine.evaluate`, shared setup in `engine.runs`.
"""

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine import defaults, distributed
from engine.atomic import write_json
from engine.batching import EpochBatches
from engine.config import ModelConfig
from engine.evaluate import evaluate_model, measure_speed
from engine.loop import train
from engine.model import count_parameters
from engine.objectives import TaskLoss, check_kd_options
from engine.options import (
    FINETUNE_SECTIONS,
    FinetuneOptions,
    KDOptions,
    OptimOptions,
    RunOptions,
    TaskDataOptions,
    TaskOptions,
    build_options,
    check_fsdp,
    check_ranges,
    to_dict,
)
from engine.report import format_table
from engine.runs import (
    check_lengths,
    check_out_dir,
    check_same_vocabulary,
    describe,
    guarded,
    interrupted,
    kept_share,
    load_frozen,
    load_task_model,
    loss_summary,
    maybe_compile,
    prepare_out_dir,
    release_replaced,
    save_model,
    setup,
    skip_input_checks,
    student_checkpoint,
)
from engine.taskdata import (
    HEAD_KEY,
    MAIN_METRIC,
    TaskData,
    check_task,
    checkpoint_label_map,
    has_task_head,
    prepare_task_data,
    seq_len,
    teacher_label_map,
)

# ---- training runs ---------------------------------------------------------------------------------------------------


def _steps_from_epochs(optim: OptimOptions, data: TaskDataOptions, td: TaskData) -> OptimOptions:
    if data.epochs > 0:
        return replace(optim, steps=max(1, math.ceil(data.epochs * td.batches_per_epoch / optim.grad_accum)))
    return optim


def run_phase(name: str, model, loss_fn: TaskLoss, td: TaskData, optim: OptimOptions, run: RunOptions,
              phase_dir: Path, model_out: Path, device, precision, tokenizer_dir, record: dict,
              data: TaskDataOptions) -> dict:  # fmt: skip
    """Train one model on the shared loop in `phase_dir` (metrics.jsonl, checkpoint/), evaluate it on the whole
    validation set and save it to `model_out`. A phase that finished before (its result.json) is not rerun on
    --resume; one interrupted is continued from its checkpoint.

    Returns:
        {"metrics", "steps", "train_seconds", "first_loss", "last_loss", "loss_curve"}, or {"interrupted", "step"}.
    """
    phase_dir.mkdir(parents=True, exist_ok=True)
    done = phase_dir / "result.json"
    if run.resume and done.is_file() and (model_out / "config.json").is_file():
        finished = json.loads(done.read_text())
        if finished["steps"] == optim.steps:  # else --steps grew: the phase continues from its checkpoint
            print(f"{name}: finished before; results read from {done}, model from {model_out}")
            ckpt.load_state_into(model, model_out)  # the trained weights, for what follows (speed, later phases)
            return finished
    # A start without a checkpoint begins afresh (the loop then starts a new metrics.jsonl).
    resume = run.resume and (phase_dir / "checkpoint" / "trainer_state.pt").is_file()
    quick = td.eval.head(run.eval_batches)

    def evaluate(step: int) -> dict:
        return evaluate_model(model, quick, device, precision, data)

    maybe_compile(run, model)
    result = train(
        model, loss_fn, td.train, optim, replace(run, resume=resume), phase_dir, device, precision,
        tokenizer_dir=tokenizer_dir, evaluate=evaluate, tokens_in=lambda b: b["attention_mask"].sum(),
        options_record=record, on_save=lambda step: release_replaced(run.out),
    )  # fmt: skip
    if result.interrupted:
        return {"interrupted": True, "step": result.step}
    metrics = evaluate_model(model, td.eval, device, precision, data)
    save_model(model, model_out, tokenizer_dir)
    out = {
        "metrics": metrics,
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        **loss_summary(phase_dir / "metrics.jsonl", phase_dir / "loss_curve.png", ("loss", "kd", "ce")),
    }
    distributed.run_on_main(lambda: write_json(done, out), share_result=False)
    return out


def _fmt_metrics(task: str, m: dict) -> tuple[str, str]:
    if task == "classification":
        return f"{100 * m['accuracy']:.2f}", f"{100 * m['macro_f1']:.2f}"
    return f"{m['exact_match']:.2f}", f"{m['f1']:.2f}"


def _table(task: str, rows: list[tuple[str, dict]]) -> str:
    header = ("model", "params", "layers", "hidden") + (
        ("accuracy %", "macro-F1 %") if task == "classification" else ("EM", "F1")
    )
    header += ("latency ms (b=1)", "throughput /s")
    lines = []
    shared = False
    for name, r in rows:
        mark = "*" if r.get("speed_of") else ""  # timed once for both: the same architecture
        shared = shared or bool(mark)
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.1f}{mark}"
        rate = "-" if r.get("throughput") is None else f"{r['throughput']:.1f}{mark}"
        lines.append(
            (name, f"{r['parameters'] / 1e6:.1f}M", str(r["layers"]), str(r["hidden_size"]),
             *_fmt_metrics(task, r), lat, rate)
        )  # fmt: skip
    table = format_table(lines, header)
    if shared:
        table += "\n* the same architecture as the distilled student: one speed measurement serves both"
    return table


def _model_entry(path, model, metrics: dict, speed: dict) -> dict:
    c = model.config
    return {
        "path": str(path),
        "arch": c.arch,
        "parameters": count_parameters(model),
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        **metrics,
        **speed,
    }


# ---- the commands ----------------------------------------------------------------------------------------------------


@guarded
def finetune(ft: FinetuneOptions, data: TaskDataOptions, optim: OptimOptions, run: RunOptions) -> dict:
    """Plain fine-tuning of `ft.model` on the task (how teachers are made); the model goes to `<out>/model`.

    Returns:
        the report (also `<out>/report.json`): validation scores, latency, loss summary; or {"interrupted": True}.
    """
    check_task(ft.task)
    device, precision = setup(run)
    if not ft.model:
        raise ValueError("--model is required (the no-argument default sets the bundled MiniLM)")
    model_dir = Path(ft.model)
    config = ModelConfig.from_pretrained(model_dir)  # a clear error for a wrong path before the data work
    check_fsdp(run, "finetune")
    check_ranges(ft, data, optim, run)
    distributed.check_batch_size(data.batch_size)
    record = to_dict(ft, data, optim, run)
    check_out_dir(run, record)
    td = prepare_task_data(ft.task, data, model_dir, run.seed, lambda ours: checkpoint_label_map(model_dir, ours))
    check_lengths(seq_len(data, ft.task), td.tokenizer, config)
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    model = load_task_model(model_dir, ft.task, td.label2id, device)
    skip_input_checks(model)
    optim = _steps_from_epochs(optim, data, td)
    print(
        f"fine-tuning {model_dir} ({describe(model)}) for {ft.task}: {td.n_train} train / {td.eval.size} validation "
        f"examples; {optim.steps} steps; {device} {precision}"
    )
    loss_fn = TaskLoss(ft.task, model, device=device, shard=distributed.shard())
    res = run_phase("fine-tuning", model, loss_fn, td, optim, run, out, out / "model", device, precision, model_dir,
                    record, data)  # fmt: skip
    if res.get("interrupted"):
        return interrupted(res["step"], out)
    speed = distributed.run_on_main(  # timed on rank 0 alone: ranks sharing a machine would slow each other
        lambda: measure_speed({"model": model}, td.eval, td.tokenizer.pad_token_id, device, precision, ft.latency_iters)
    )
    report = {
        "task": ft.task,
        "model": _model_entry(out / "model", model, res["metrics"], speed["model"]),
        "validation_examples": td.eval.size,
        "steps": res["steps"],
        "train_seconds": res["train_seconds"],
        "first_loss": res["first_loss"],
        "last_loss": res["last_loss"],
        "loss_curve": res["loss_curve"],
        "device": str(device),
        "precision": precision,
    }
    if td.label2id is not None:
        report["labels"] = sorted(td.label2id, key=td.label2id.get)
    distributed.run_on_main(lambda: write_json(out / "report.json", report), share_result=False)
    print(_table(ft.task, [("fine-tuned", report["model"])]))
    print(f"loss {report['first_loss']} -> {report['last_loss']} in {report['steps']} steps; model: {out / 'model'}")
    return report


@guarded
def distill_task(opts: TaskOptions, data: TaskDataOptions, kd: KDOptions, optim: OptimOptions,
                 run: RunOptions) -> dict:  # fmt: skip
    """Distill a fine-tuned teacher into a student on the task; with `opts.baseline`, also fine-tune the same
    student without the teacher; evaluate all three and time teacher and student.

    Outputs under `<out>`: `student/` (the distilled student), `baseline_student/`, the per-run folders `distill/`
    and `baseline/` (metrics.jsonl, checkpoint/, loss_curve.png), `report.json`.

    Returns:
        the report, or {"interrupted": True, "step"}.
    """
    check_task(opts.task)
    device, precision = setup(run)
    task = opts.task
    cache = None  # with --teacher-cache no teacher is loaded: its outputs come from the cache (engine.teacher_cache)
    if opts.teacher_cache:
        from engine.teacher_cache import TaskTeacherCache

        cache = TaskTeacherCache(opts.teacher_cache, task)
        teacher_dir = cache.teacher_folder(opts.teacher, opts.student or opts.student_from)
    elif not opts.teacher:
        raise ValueError(
            "--teacher is required: a checkpoint fine-tuned on the task (make one with `distill finetune`)"
        )
    else:
        teacher_dir = Path(opts.teacher)
        ModelConfig.from_pretrained(teacher_dir)
    if cache is None and not has_task_head(teacher_dir, task):
        raise ValueError(
            f"teacher {teacher_dir} has no {task} head ({HEAD_KEY[task]} is not in its weights): it has not been "
            f"fine-tuned for {task}; fine-tune it first with `distill finetune --task {task} --model {teacher_dir}`"
        )
    check_fsdp(run, "task")
    check_ranges(opts, data, kd, optim, run)
    distributed.check_batch_size(data.batch_size)
    check_kd_options(task, kd)
    record = to_dict(opts, data, kd, optim, run)
    check_out_dir(run, record)
    label2id_of = (lambda ours: teacher_label_map(teacher_dir, ours)) if task == "classification" else None
    td = prepare_task_data(task, data, teacher_dir, run.seed, label2id_of)
    if cache is not None:
        cache.check(td, kd.temperature, opts.teacher)
    teacher = cache or load_frozen(teacher_dir, task, device, precision, label2id=td.label2id)
    source = Path(opts.student_from or teacher_dir)
    # A student made from --student-from's layers has its positions; a given one is checked from its config.
    check_lengths(seq_len(data, task), td.tokenizer, teacher, ModelConfig.from_pretrained(opts.student or source))
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    student_dir = student_checkpoint(opts.student, source, out, opts.student_arch, opts.student_num_layers)

    def new_student():
        torch.manual_seed(run.seed)  # the distilled and the baseline student start from the same weights
        return load_task_model(student_dir, task, td.label2id, device)

    student = new_student()
    check_same_vocabulary(teacher_dir, student_dir, teacher, student)
    check_lengths(seq_len(data, task), td.tokenizer, teacher, student)
    skip_input_checks(student, *([teacher] if cache is None else []))
    optim = _steps_from_epochs(optim, data, td)
    print(
        f"teacher {teacher_dir} ({cache.describe() if cache else describe(teacher)}) -> student {student_dir} "
        f"({describe(student)}); {task}: {td.n_train} train / {td.eval.size} validation examples; {optim.steps} "
        f"steps; {device} {precision}"
    )
    t0 = time.perf_counter()
    teacher_metrics = cache.teacher_metrics(td) if cache else evaluate_model(teacher, td.eval, device, precision, data)
    print(f"teacher validation {MAIN_METRIC[task]}: {teacher_metrics[MAIN_METRIC[task]]:.4f}")

    distilled = run_phase(
        "distillation", student, TaskLoss(task, student, teacher, kd, device, distributed.shard()), td, optim, run,
        out / "distill", out / "student", device, precision, teacher_dir, record, data,
    )  # fmt: skip
    if distilled.get("interrupted"):
        return interrupted(distilled["step"], out / "distill")
    baseline = None
    if opts.baseline:
        base_model = new_student()
        td.train = EpochBatches(td.train.make_epoch, run.seed)  # the same data order as the distilled student
        baseline = run_phase(
            "baseline", base_model, TaskLoss(task, base_model, device=device, shard=distributed.shard()), td, optim,
            run, out / "baseline", out / "baseline_student", device, precision, teacher_dir, record, data,
        )  # fmt: skip
        if baseline.get("interrupted"):
            return interrupted(baseline["step"], out / "baseline")
        del base_model

    timed = {"student": student} if cache else {"teacher": teacher, "student": student}  # a cache has no speed
    speed = distributed.run_on_main(  # timed on rank 0 alone: ranks sharing a machine would slow each other
        lambda: measure_speed(timed, td.eval, td.tokenizer.pad_token_id, device, precision, opts.latency_iters)
    )
    t_speed, s_speed = speed.get("teacher", {}), speed["student"]
    key = MAIN_METRIC[task]
    t_entry = cache.entry(teacher_metrics) if cache else _model_entry(teacher_dir, teacher, teacher_metrics, t_speed)
    report = {
        "task": task,
        "teacher": t_entry,
        "distilled_student": _model_entry(out / "student", student, distilled["metrics"], s_speed),
        "validation_examples": td.eval.size,
        "train_examples": td.n_train,
        "metric": key,
        "student_keeps_of_teacher": kept_share(distilled["metrics"][key], teacher_metrics[key]),  # None: teacher ~0
        "kd": to_dict(kd)["kd"],
        "steps": distilled["steps"],
        "distill_seconds": distilled["train_seconds"],
        "distill_first_loss": distilled["first_loss"],
        "distill_last_loss": distilled["last_loss"],
        "latency_speedup": t_speed["latency_ms"] / s_speed["latency_ms"] if s_speed and t_speed else None,
        "throughput_speedup": s_speed["throughput"] / t_speed["throughput"] if s_speed and t_speed else None,
        "device": str(device),
        "precision": precision,
    }
    rows = [("teacher", report["teacher"]), ("distilled student", report["distilled_student"])]
    if baseline is not None:
        report["baseline_student"] = _model_entry(out / "baseline_student", student, baseline["metrics"], s_speed)
        if s_speed:
            report["baseline_student"]["speed_of"] = "distilled_student"  # one architecture, timed once
        report["distilled_minus_baseline"] = distilled["metrics"][key] - baseline["metrics"][key]
        report["baseline_seconds"] = baseline["train_seconds"]
        rows.append(("student, no teacher", report["baseline_student"]))
    if td.label2id is not None:
        report["labels"] = sorted(td.label2id, key=td.label2id.get)
    if cache is not None:
        report["teacher_cache"] = cache.summary()
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    distributed.run_on_main(lambda: write_json(out / "report.json", report), share_result=False)
    print(_table(task, rows))
    share = report["student_keeps_of_teacher"]
    line = (
        f"distilled student keeps {100 * share:.1f}% of the teacher's {key}"
        if share is not None
        else f"the teacher's {key} is too low to compare the student's with"
    )
    if baseline is not None:
        diff = report["distilled_minus_baseline"] * (100 if task == "classification" else 1)
        line += f"; {diff:+.2f} points against the same student trained without a teacher"
    if report["latency_speedup"]:
        line += f"; {report['latency_speedup']:.2f}x lower latency, {report['throughput_speedup']:.2f}x throughput"
    print(line)
    print(f"report: {out / 'report.json'}")
    return report


def bundled_teacher(data: TaskDataOptions, run: RunOptions) -> Path:
    """MiniLM fine-tuned on the bundled BBC News training split, made once and cached (`defaults.cached_model`).

    The cache key covers the teacher's recipe and the split (validation_fraction, split_seed), so the teacher never
    saw a validation example of the run that uses it.
    """
    split = {"validation_fraction": data.validation_fraction, "split_seed": data.split_seed}
    recipe = {**defaults.FINETUNE_PROFILE, **defaults.DEMO_TASK_TEACHER, **split}

    def make(run_dir: Path) -> dict:
        profile = {
            **recipe,
            "task": "classification",
            "model": str(defaults.bundled_teacher_dir()),
            "data": [str(defaults.bbc_news_dir())],
            "out": str(run_dir),
            "overwrite": True,
            "device": run.device,
            "precision": run.precision,
            "progress": run.progress,
            "seed": run.seed,
        }
        return finetune(*build_options(argparse.Namespace(), *FINETUNE_SECTIONS, profile=profile))

    return defaults.cached_model("minilm-l6-bbc-classifier", recipe, make, "fine-tuning all-MiniLM-L6-v2 on BBC News")

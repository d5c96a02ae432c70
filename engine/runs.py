"""What every command's run shares: setup, the output-folder guard, models in and out, and the closing summary.

The commands (`engine.pretrain`, `engine.finetune`) are sequences of these steps; each piece exists once here:
    setup               device, precision and seed from RunOptions
    guarded             the command decorator that never leaves a run folder half-made (below)
    check_out_dir       the run-folder checks, made before any work: another run, other options on --resume, a
                        finished run
    prepare_out_dir     the run-folder guard (refuses to clobber another run; --resume / --overwrite)
    load_frozen         a teacher: eval mode, no gradients, weights in the compute dtype on GPUs (no master copy)
    student_checkpoint  the given student, or one initialized from teacher layers into <out>/student_init
    save_model          a model out, a full disk said in one line
    load_task_model     a checkpoint with a classification (for a label map) or QA head
    check_same_vocabulary, check_lengths   the compatibility checks made once, before any step
    maybe_compile       torch.compile of the encoders (--compile)
    loss_summary, interrupted, describe, kept_share    the closing lines of a run

A run folder holds a run once it has a checkpoint; until then it is a start, and a start that fails (bad input found
late, Ctrl-C during setup, a full disk at the first save) is removed by `guarded`, so that a rerun begins afresh. The
lifecycle of `<out>`:
    check_out_dir     a killed run's leftovers are settled first: a checkpoint replacement cut between its two
                      renames is completed, stale `.NAME.tmp-*` folders removed; then a run in the folder is refused
                      without --resume/--overwrite, and --resume compares the options with the run's (`run.json`):
                      a change that breaks the exact continuation is refused with the list of differences, a safe
                      one (logging cadence, more --steps) is allowed; --resume of a finished run says so
    prepare_out_dir   after every input is checked: `run.json` written; with --overwrite the earlier run is only
                      moved aside (`.<out>.replaced-<pid>-<id>`), and deleted once the new run saves its first
                      checkpoint (`release_replaced`)
    guarded (exit)    a start without a checkpoint is removed and the earlier run put back; a `kill -9` leaves the
                      same to the next start, which settles it the same way
A folder is held under an advisory lock (flock on the folder) for the command's duration, so two processes never
share one; the kernel drops the lock of a killed process.
"""

import fcntl
import functools
import json
import os
import sys
from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine import distributed
from engine.atomic import (
    explain_write_errors,
    finish_interrupted_swaps,
    remove,
    stale_temporaries,
    temporaries,
    tensor_bytes,
    write_json,
)
from engine.config import ModelConfig
from engine.loop import compute_dtype, resolve_device, resolve_precision
from engine.model import count_parameters
from engine.options import RunOptions
from engine.report import plot_curves, read_history

RUN_MARKER = "run.json"


def setup(run: RunOptions) -> tuple[torch.device, str]:
    """(device, precision) for the run, and the global seed set; under torchrun the process group joined and the
    device this rank's (cuda:LOCAL_RANK). Every rank gets the same seed: models are built alike on all."""
    device = distributed.init(resolve_device(run.device))
    precision = resolve_precision(run.precision, device)
    torch.manual_seed(run.seed)
    return device, precision


REPORT = "report.json"
# What the commands write into a run folder: a start that never reached a checkpoint is cleared of these, and only of
# these (we never delete files we did not write).
RUN_FILES = (RUN_MARKER, REPORT, "metrics.jsonl", "loss_curve.png", "cache", "student_init", "checkpoint", "student",
             "model", "baseline_student", "distill", "baseline")  # fmt: skip
# Options a resumed run may change: how it runs and reports, not what it computes. Any other change breaks the exact
# continuation of the checkpoint's run and is refused. --steps (and --epochs, which sets it) may change too: the
# learning-rate schedule is then defined over the new total.
RESUME_SAFE = {("run", k) for k in ("log_every", "eval_every", "save_every", "eval_batches", "compile", "fsdp")} | {
    ("data", "cache_dir"), ("data", "tokenize_workers"),
    ("finetune", "latency_iters"), ("task", "latency_iters"), ("task", "baseline"),
    ("taskdata", "n_best"), ("taskdata", "max_answer_len"),
}  # fmt: skip
RESUME_SCHEDULE = {("optim", "steps"), ("taskdata", "epochs")}
_NOT_COMPARED = {("run", "out"), ("run", "resume"), ("run", "overwrite"), ("run", "progress")}

_guarded: dict[str, int | None] = {}  # run folders of the running guarded commands → their lock's fd (None: none yet)


class RunFinished(Exception):
    """--resume of a finished run: `guarded` prints the message and returns the run's report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report

    def __reduce__(self):  # picklable with its report: rank 0's verdict reaches every rank
        return (RunFinished, (str(self), self.report))


def guarded(command):
    """Decorate a command whose last options are RunOptions: its run folder is locked while it runs and, when it
    ends without a checkpoint (an error, Ctrl-C), cleared of what it wrote, with the run that --overwrite moved
    aside put back. A run with a checkpoint is kept: it can be resumed."""

    @functools.wraps(command)
    def run_command(*args, **kwargs):
        if not distributed.is_main():  # rank 0 alone holds and tidies the folder; the others share its verdicts
            try:
                return command(*args, **kwargs)
            except RunFinished as e:
                return e.report
        run = next(a for a in (*args, *kwargs.values()) if isinstance(a, RunOptions))
        out, key = Path(run.out), _key(run.out)
        if key in _guarded:  # a guarded command calling another on the same folder: the outer one guards it
            return command(*args, **kwargs)
        created = not out.exists()
        _guarded[key] = None
        try:
            _lock(out)
            try:
                result = command(*args, **kwargs)
            except RunFinished as e:
                print(e)
                return e.report
            except BaseException:
                if _guarded[key] is not None:
                    try:
                        _settle(out, created, own=True)
                    except Exception as e:  # the command's own error is the one to report
                        print(f"note: could not clear {out} after the failure ({e})", file=sys.stderr)
                raise
            if _guarded[key] is not None:
                _settle(out, created, own=True)
            return result
        finally:
            _unlock(key)
            del _guarded[key]

    return run_command


def _key(out) -> str:
    return str(Path(out).resolve())


def _lock(out: Path) -> None:
    """Lock `out` for the guarded command that runs in it (a no-op outside one, or before the folder exists); again
    when the folder at that path is another one now (an earlier run put back, a new one made)."""
    key = _key(out)
    if key not in _guarded or not out.is_dir():
        return
    fd = _guarded[key]
    if fd is not None:
        if os.fstat(fd).st_ino == os.stat(out).st_ino:
            return
        _unlock(key)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FileExistsError(
            f"{out} is in use by another distill process; wait for it to end or choose another --out"
        ) from None
    _guarded[key] = fd


def _unlock(key: str) -> None:
    fd = _guarded.get(key)
    if fd is not None:
        os.close(fd)
        _guarded[key] = None


def has_checkpoint(out: Path) -> bool:
    """A run folder holds a run once it (or a phase subfolder, `distill task`'s distill/ and baseline/) has a
    checkpoint."""
    out = Path(out)
    return (out / "checkpoint" / "trainer_state.pt").is_file() or any(out.glob("*/checkpoint/trainer_state.pt"))


def checkpoint_step(out: Path) -> int:
    """The furthest step among the folder's checkpoints (read with mmap: the optimizer state is not loaded)."""
    files = [out / "checkpoint" / "trainer_state.pt", *out.glob("*/checkpoint/trainer_state.pt")]
    return max(
        (torch.load(f, map_location="cpu", weights_only=False, mmap=True)["step"] for f in files if f.is_file()),
        default=0,
    )


def _ours(out: Path) -> dict | None:
    """The folder's run record when it is one of ours (a `run.json` with a "run" section), else None."""
    try:
        record = json.loads((out / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run"), dict) else None


def _clear(out: Path) -> None:
    for name in RUN_FILES:
        if (out / name).exists():
            remove(out / name)


def _asides(out: Path, own: bool) -> list[Path]:
    """Earlier runs moved aside by an --overwrite that has not produced its first checkpoint yet."""
    return [p for p, m in temporaries(out.parent, kinds=("replaced",), own=own) if m["name"] == out.name]


def release_replaced(out: str | Path) -> None:
    """Delete the run that --overwrite moved aside: the new one has a checkpoint now (the loop's `on_save`)."""
    for p in _asides(Path(out), own=True):
        remove(p)


def _settle(out: Path, created: bool = False, own: bool = False) -> None:
    """After a command (`own`: its own aside too) or a killed one: a folder with a checkpoint keeps it and the aside
    goes; one without is cleared of what we wrote and the aside is put back."""
    asides = _asides(out, own)
    if not (own or asides):
        return  # at a start, a failed start without an aside is left to prepare_out_dir (it says so)
    if out.is_dir() and has_checkpoint(out):
        for p in asides:
            remove(p)
        return
    if out.is_dir() and _ours(out) is not None:
        _clear(out)
    if out.is_dir() and not any(out.iterdir()) and (created or asides):
        out.rmdir()
    if asides:
        if out.exists():
            print(f"note: the earlier run in {out} is kept in {asides[-1]} ({out} holds other files)", file=sys.stderr)
        else:
            os.rename(asides[-1], out)
            print(f"{out}: the earlier run is back in place (the new one stopped before its first checkpoint)")


def _tidy(out: Path) -> None:
    """What killed processes left: an --overwrite cut short (settled), a checkpoint replacement cut between its two
    renames (completed: resume finds it), stale temporary folders (each can be a whole checkpoint: removed)."""
    _settle(out)
    if not out.is_dir():
        return
    for folder in (out, *(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))):
        finish_interrupted_swaps(folder)
        for p in stale_temporaries(folder):
            remove(p)


def _state(out: Path) -> str:
    """One of: empty; run (ours, with a checkpoint); start (ours, no checkpoint: a failed start); foreign."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "empty"
    if _ours(out) is None:
        return "foreign"
    return "run" if has_checkpoint(out) else "start"


def _settled_state(out: Path) -> str:
    """`out` locked and what killed processes left settled (`_tidy`; locked again, as the folder there may be another
    one now), then its `_state`: "empty", "run" or "start"; a folder not ours is refused."""
    _lock(out)
    _tidy(out)
    _lock(out)
    state = _state(out)
    if state == "foreign":
        raise FileExistsError(f"{out} is not empty and holds no run of ours; choose another --out")
    return state


def _held(out: Path) -> str:
    if (out / REPORT).is_file():
        return (
            f"{out} already holds a finished run; pass --resume with a larger --steps to train it further, or "
            "--overwrite to replace it"
        )
    return (
        f"{out} already holds a run (checkpoint at step {checkpoint_step(out)}); pass --resume to continue it or "
        "--overwrite to replace it"
    )


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def option_changes(saved: dict, record: dict) -> list[tuple[str, str, object, object]]:
    """(section, option, saved value, new value) for every option that differs between two run records."""
    changes = []
    for section, values in record.items():
        before = saved.get(section)
        if not isinstance(values, dict) or not isinstance(before, dict):
            continue
        for key, value in values.items():
            if (section, key) not in _NOT_COMPARED and before.get(key) != value:
                changes.append((section, key, before.get(key), value))
    return changes


def check_out_dir(run: RunOptions, record: dict) -> None:
    """`_check_out_dir` on rank 0; its refusal is raised on every rank."""
    distributed.run_on_main(lambda: _check_out_dir(run, record), share_result=False)


def _check_out_dir(run: RunOptions, record: dict) -> None:
    """The run-folder checks, made before any work so that a refusal costs nothing (they write nothing of the run;
    what killed processes left is settled first, see `_tidy`).

    Raises:
        FileExistsError: the folder holds another run (no --resume/--overwrite), files not ours, or is in use.
        ValueError: --resume with options that break the exact continuation (listed), or fewer --steps than done.
        RunFinished: --resume of a finished run with the same budget (`guarded` answers it with the report).
    """
    out = Path(run.out)
    state = _settled_state(out)
    if state != "run":
        return
    if not run.resume:
        if not run.overwrite:
            raise FileExistsError(_held(out))
        return
    changes = option_changes(_ours(out), record)
    refused = [c for c in changes if (c[0], c[1]) not in RESUME_SAFE | RESUME_SCHEDULE]
    if refused:
        listed = ", ".join(f"{_flag(k)} {a!r} -> {b!r}" for _, k, a, b in refused)
        raise ValueError(
            f"--resume: {out} was started with other options ({listed}); a resumed run continues its checkpoint "
            f"exactly only with them unchanged. Resume with the run's values ({out / RUN_MARKER}), or start a new "
            "run (another --out, or --overwrite)"
        )
    step = checkpoint_step(out)
    steps = record.get("optim", {}).get("steps")
    if not record.get("taskdata", {}).get("epochs") and steps is not None and steps < step:
        raise ValueError(f"--steps {steps}: {out} has trained {step} steps already; give --steps {step} or more")
    if (out / REPORT).is_file() and not any((c[0], c[1]) in RESUME_SCHEDULE for c in changes):
        report = json.loads((out / REPORT).read_text())
        raise RunFinished(
            f"{out} holds a finished run ({report.get('steps', step)} steps): nothing to resume; its report is "
            f"{out / REPORT}. Give a larger --steps to train it further, or --overwrite to start over",
            report,
        )


def prepare_out_dir(out: str | Path, resume: bool, overwrite: bool, record: dict) -> Path:
    """`_prepare_out_dir` on rank 0 (the others wait for the folder); its refusal is raised on every rank."""
    return distributed.run_on_main(lambda: _prepare_out_dir(out, resume, overwrite, record))


def _prepare_out_dir(out: str | Path, resume: bool, overwrite: bool, record: dict) -> Path:
    """Create or reuse the output folder without clobbering another run; called once every input is checked.

    A folder that holds a run (its `run.json` and a checkpoint) is refused unless `resume` (continue it: the record
    is updated with the options it changes, listed in `run.json`'s "resumed") or `overwrite` (replace it: inside a
    `guarded` command it is moved aside until the new run's first checkpoint, else deleted now). A folder of ours
    without a checkpoint is a start that failed: it is cleared and the run starts afresh, with or without `resume`.
    Anything else non-empty is refused: we never delete files we did not write.
    """
    out = Path(out)
    state = _settled_state(out)
    if state == "run" and resume:
        saved = _ours(out)
        changes = option_changes(saved, record)
        if changes:
            step = checkpoint_step(out)
            listed = "; ".join(f"{_flag(k)} {a!r} -> {b!r}" for _, k, a, b in changes)
            if any((c[0], c[1]) in RESUME_SCHEDULE for c in changes):
                listed += " (the learning-rate schedule now runs over the new total)"
                (out / REPORT).unlink(missing_ok=True)  # it reports the earlier budget; the new one writes its own
            print(f"resuming {out} at step {step} with changed options: {listed}")
            history = saved.get("resumed", []) + [
                {"step": step, "changed": {f"{s}.{k}": [a, b] for s, k, a, b in changes}}
            ]
            record = {**record, "resumed": history}
        elif "resumed" in saved:
            record = {**record, "resumed": saved["resumed"]}
        write_json(out / RUN_MARKER, record)
        return out
    if state == "run":
        if not overwrite:
            raise FileExistsError(_held(out))
        if _key(out) in _guarded:
            os.rename(out, out.parent / f".{out.name}.replaced-{os.getpid()}-{os.urandom(4).hex()}")
        else:
            remove(out)
    elif state == "start":
        print(f"{out}: an earlier start never reached a checkpoint; starting afresh")
        _clear(out)
    elif resume:
        print(f"--resume: {out} holds no run yet; starting one")
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)
    write_json(out / RUN_MARKER, record)
    return out


def load_frozen(path: str | Path, head: str, device: torch.device, precision: str, **kwargs) -> torch.nn.Module:
    """A teacher: loaded with `head`, in eval mode with no gradients; on GPUs its weights are held in the compute
    dtype (it is never updated, so it needs no fp32 master copy)."""
    dtype = compute_dtype(precision) if device.type == "cuda" else torch.float32
    loader = load_task_model if head in ("classification", "qa") else _load_head
    model = loader(path, head, device=device, dtype=dtype, **kwargs)
    return model.eval().requires_grad_(False)


def _load_head(path, head, device, dtype):
    if head == "mlm" and not ckpt.has_mlm_head(path):
        raise ValueError(
            f"teacher {path} has no MLM head (an encoder-only checkpoint); train one first with "
            f"`distill adapt-head --model {path} --out TEACHER_DIR` and pass --teacher TEACHER_DIR"
        )
    return ckpt.load_model(path, head=head, dtype=dtype, device=device)[0]


def student_checkpoint(student: str, source: str | Path, out: Path, arch: str, num_layers: int = 0,
                       layers: list[int] | None = None) -> Path:  # fmt: skip
    """The student's checkpoint folder: `student` when given, else one initialized from `source`'s layers into
    `<out>/student_init` (once: a resumed run finds it there)."""
    if student:
        return Path(student)
    from engine.student import init_student

    student_dir = out / "student_init"
    if not (student_dir / "config.json").is_file():
        distributed.run_on_main(
            lambda: init_student(source, student_dir, layers=layers or None, num_layers=num_layers or None, arch=arch),
            share_result=False,
        )
    return student_dir


def save_model(model, path: Path, tokenizer_dir=None) -> Path:
    """`checkpoint.save_model` (by rank 0), with a full disk said in one line (how much space the model needs)."""

    def save() -> None:
        with explain_write_errors(path, "the model", lambda: tensor_bytes(model.state_dict())):
            ckpt.save_model(model, path, tokenizer_dir=tokenizer_dir)

    distributed.run_on_main(save, share_result=False)
    return Path(path)


def load_task_model(
    path: str | Path, task: str, label2id: dict[str, int] | None = None, device="cpu", dtype=None
) -> torch.nn.Module:
    """A checkpoint as a SequenceClassifier (for `label2id`) or QuestionAnswerer.

    A checkpoint without the head gets a fresh one (`checkpoint.load_model` keeps BERT's pooler when the file has
    it). A classifier trained for other labels (another count, or other names) is replaced by a fresh one for
    these labels: its body is kept, as when fine-tuning from any checkpoint. The config records
    `label2id`/`id2label`, so the saved checkpoint names its classes.
    """
    from engine.taskdata import _generic_names, has_task_head

    if task == "qa":
        return ckpt.load_model(path, head="qa", dtype=dtype, device=device)[0]
    n = len(label2id)
    cfg = ModelConfig.from_pretrained(path)
    id2label = {i: name for name, i in label2id.items()}
    if has_task_head(path, task) and (
        cfg.num_labels != n or (cfg.id2label != id2label and not _generic_names(cfg.id2label))
    ):
        model = ckpt.load_model(path, head="classification", dtype=dtype, device=device)[0]
        print(f"{path}: its classifier is for {cfg.num_labels} other labels; a new one is trained for {n} labels")
        fresh = torch.nn.Linear(model.config.hidden_size, n, device=device, dtype=model.classifier.weight.dtype)
        with torch.no_grad():
            fresh.weight.normal_(0.0, model.config.initializer_range)
            fresh.bias.zero_()
        model.classifier = fresh
    else:
        model = ckpt.load_model(path, head="classification", dtype=dtype, device=device, num_labels=n)[0]
    model.config = model.config.replace(id2label=id2label, label2id=dict(label2id))
    return model


def check_same_vocabulary(teacher_dir: Path, student_dir: Path, teacher, student) -> None:
    """Distillation compares distributions over one vocabulary: sizes and tokenizer files must agree."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(
            f"vocabulary mismatch: teacher has {teacher.config.vocab_size} tokens, student "
            f"{student.config.vocab_size}; the student must use the teacher's tokenizer"
        )
    for name in ("vocab.txt", "tokenizer.json"):
        a, b = Path(teacher_dir) / name, Path(student_dir) / name
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            raise ValueError(
                f"tokenizer mismatch: {name} differs between teacher {teacher_dir} and student {student_dir}"
            )


def check_lengths(max_len: int, tokenizer, *models) -> None:
    """Every model must take `max_len` positions and every id the tokenizer makes; a clear error names the flag.
    Models or their configs (`ModelConfig`): the check runs before any data is tokenized."""
    for m in models:
        c = getattr(m, "config", m)
        if max_len > c.max_position_embeddings:
            raise ValueError(
                f"--max-seq-len {max_len} exceeds a model's position table ({c.max_position_embeddings} positions); "
                f"lower --max-seq-len to {c.max_position_embeddings} or less"
            )
        if len(tokenizer) > c.vocab_size:
            raise ValueError(
                f"tokenizer/vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens but a model's vocabulary "
                f"has {c.vocab_size}; use the model's own tokenizer"
            )


def skip_input_checks(*models) -> None:
    """Turn off the per-forward token-id check (a host read of the ids) once `check_lengths` has vouched for the
    data: every id comes from a tokenizer no larger than each model's vocabulary."""
    for m in models:
        m.encoder.validate_inputs = False


def maybe_compile(run: RunOptions, *models) -> None:
    """`torch.compile` each model's encoder in place when --compile is given."""
    if run.compile:
        for m in models:
            m.encoder = torch.compile(m.encoder)


def loss_summary(metrics_path: Path, curve_path: Path, keys: tuple[str, ...]) -> dict:
    """First and last logged loss of a run and its loss-curve PNG (None when the plot could not be made); made by
    rank 0, which wrote the log."""
    return distributed.run_on_main(lambda: _loss_summary(metrics_path, curve_path, keys))


def _loss_summary(metrics_path: Path, curve_path: Path, keys: tuple[str, ...]) -> dict:
    history = read_history(metrics_path)
    lines = [h for h in history if "loss" in h]
    curve = plot_curves(history, curve_path, keys=keys)
    return {
        "first_loss": lines[0]["loss"] if lines else None,
        "last_loss": lines[-1]["loss"] if lines else None,
        "loss_curve": str(curve) if curve else None,
    }


SCORE_FLOOR = 1e-3  # a teacher scoring below this (a random or untrained one) gives no ratio worth printing


def kept_share(student: float, teacher: float) -> float | None:
    """The student's score as a share of the teacher's, or None when the teacher scores below SCORE_FLOOR (a share of
    ~0 is noise: a student at 0.0139 of a teacher at 1e-9 "keeps 1388888888.9%")."""
    return student / teacher if teacher >= SCORE_FLOOR else None


def interrupted(step: int, where: Path) -> dict:
    """The line printed when a run stops on a signal, and the report it returns."""
    print(f"interrupted at step {step}; checkpoint saved in {where / 'checkpoint'}; continue with --resume")
    return {"interrupted": True, "step": step}


def describe(model) -> str:
    c = model.config
    return f"{c.arch}, {c.num_layers} layers, hidden {c.hidden_size}, {count_parameters(model) / 1e6:.1f}M params"

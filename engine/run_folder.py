"""The run folder: a command's `<out>` never loses work and never holds a half-made start.

    guarded             the command decorator that never leaves a run folder half-made (below)
    check_out_dir       the run-folder checks, made before any work: another run, other options on --resume, a
                        finished run
    prepare_out_dir     the run-folder guard (refuses to clobber another run; --resume / --overwrite)
    release_replaced    the run --overwrite moved aside deleted, once the new one has a checkpoint

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

from engine import distributed
from engine.atomic import finish_interrupted_swaps, remove, stale_temporaries, temporaries, write_json
from engine.options import RunOptions

RUN_MARKER = "run.json"
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

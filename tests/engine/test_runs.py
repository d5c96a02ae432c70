"""engine/run_folder.py (and engine/runs.py): a run folder never loses work. Overwrite, resume, crashes (real `kill -9`s
of `python -m engine`), leftovers, bad configuration and the CLI's one-line errors, each reproduced on a tiny teacher
and real text.

The subprocess tests run the real command line; the reference runs go through `cli.main` in this process with the same
arguments, so that both sides build exactly the same options.
"""

import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import engine
from engine import atomic, cli, loop, runs
from engine import pretrain as pt
from engine.atomic import stale_temporaries, write_json
from engine.defaults import bbc_news_dir
from engine.options import DataOptions, MaskingOptions, ModelOptions, ObjectiveOptions, OptimOptions, RunOptions
from engine.scaler import lr_at

REPO = Path(engine.__file__).resolve().parents[1]
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
LEFTOVER = re.compile(r"\.(tmp|old|replaced)-\d+-")  # what an atomic save or an --overwrite leaves when killed


# ---- fixtures and helpers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, minilm_dir):
    """A tiny random BERT with an MLM head (64 positions) and MiniLM's tokenizer: it scores ~0, which item 6 uses."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertForMaskedLM(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (Path(minilm_dir) / name).is_file():
            shutil.copy(Path(minilm_dir) / name, path / name)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 real BBC tech articles as .txt files."""
    d = tmp_path_factory.mktemp("corpus")
    for f in sorted((bbc_news_dir() / "tech").glob("*.txt"))[:20]:
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token_cache")


def _options(teacher, corpus, cache, out, **over):
    m = ModelOptions(teacher=str(teacher), student_num_layers=1)
    d = DataOptions(data=[str(corpus)], max_seq_len=32, batch_size=4, heldout_fraction=0.1, cache_dir=str(cache))
    mk, o = MaskingOptions(), ObjectiveOptions()
    op = OptimOptions(steps=4, lr=5e-3, warmup=0.25)
    r = RunOptions(out=str(out), log_every=1, progress=False, eval_batches=1, seed=0)
    for k, v in over.items():
        section = next(s for s in (m, d, mk, o, op, r) if hasattr(s, k))
        setattr(section, k, v)
    return m, d, mk, o, op, r


def _argv(teacher, corpus, cache, out, *more) -> list[str]:
    return [
        "pretrain", "--teacher", str(teacher), "--data", str(corpus), "--cache-dir", str(cache), "--out", str(out),
        "--student-num-layers", "1", "--max-seq-len", "32", "--batch-size", "4", "--heldout-fraction", "0.1",
        "--eval-batches", "1", "--log-every", "1", "--no-progress", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher, corpus, cache):
    """A finished 4-step run, copied by the tests that need one (`_copy`)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the autouse one that sets this
        mp.setenv("TRITON_INTERPRET", "0")
        pt.pretrain(*_options(teacher, corpus, cache, out))
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary or moved-aside entries under `folder` and beside it."""
    names = [p for p in folder.rglob("*")] + (list(folder.parent.iterdir()) if folder.parent.is_dir() else [])
    return sorted(str(p) for p in names if LEFTOVER.search(p.name))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if k not in ("elapsed_s", "tokens_per_s")} for x in lines]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "not bit-identical"


# ---- 1. --overwrite never destroys a run before the new one has a checkpoint ----------------------------------------


@pytest.mark.parametrize("bad", ["missing data", "temperature 0", "no usable text", "Ctrl-C while tokenizing"])
def test_overwrite_with_bad_input_keeps_the_earlier_run(finished, teacher, corpus, cache, tmp_path, monkeypatch, bad):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    over = {"overwrite": True}
    expected = ValueError
    if bad == "missing data":
        over["data"], expected = [str(tmp_path / "missing.txt")], FileNotFoundError
    elif bad == "temperature 0":
        over["temperature"] = 0.0
    elif bad == "no usable text":  # found only after the folder was prepared (too few sequences)
        (tmp_path / "notes.txt").write_text("too short")
        over["data"] = [str(tmp_path / "notes.txt")]
    else:
        expected = KeyboardInterrupt

        def interrupted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: Python's handler raises KeyboardInterrupt
            time.sleep(5)

        monkeypatch.setattr(pt, "build_store", interrupted)  # the token store's build (engine.tokenstore)
        over["cache_dir"] = ""  # the default cache in <out>/cache: written by the new run, so it must go too
    with pytest.raises(expected):
        pt.pretrain(*_options(teacher, corpus, cache, out, **over))
    assert _snapshot(out) == before  # checkpoint, student, metrics, report: byte for byte
    assert _leftovers(out) == []


def test_overwrite_replaces_the_earlier_run_at_the_new_ones_first_checkpoint(finished, teacher, corpus, cache,
                                                                             tmp_path, monkeypatch):  # fmt: skip
    out = _copy(finished, tmp_path)
    seen = []
    real = pt.release_replaced

    def spying(path):
        seen.append(len(_leftovers(out)))  # the earlier run, moved aside, until this first checkpoint
        real(path)
        seen.append(len(_leftovers(out)))

    monkeypatch.setattr(pt, "release_replaced", spying)
    report = pt.pretrain(*_options(teacher, corpus, cache, out, overwrite=True, steps=2, save_every=1))
    assert seen[:2] == [1, 0] and report["steps"] == 2
    assert json.loads((out / "run.json").read_text())["optim"]["steps"] == 2 and _leftovers(out) == []


def test_kill_9_during_an_overwrite_puts_the_earlier_run_back(finished, teacher, corpus, cache, tmp_path):
    """A real `kill -9` while the earlier run is moved aside (before the new one's first checkpoint): the next start
    puts it back; the plain rerun then finds it whole."""
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    argv = _argv(teacher, corpus, cache, out, "--steps", "4", "--overwrite")
    proc = subprocess.Popen([sys.executable, "-m", "engine", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for(proc, lambda: any(LEFTOVER.search(p.name) for p in tmp_path.iterdir()) and (out / "run.json").is_file())
    proc.kill()
    proc.wait()
    assert not (out / "checkpoint").exists()  # killed before its first checkpoint
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        pt.pretrain(*_options(teacher, corpus, cache, out))
    assert _snapshot(out) == before and _leftovers(out) == []


# ---- 2. --resume compares the options ------------------------------------------------------------------------------


def test_resume_refuses_options_that_break_exactness(finished, teacher, corpus, cache, tmp_path):
    out = _copy(finished, tmp_path)
    record = (out / "run.json").read_bytes()
    changed = dict(lr=1e-3, temperature=4.0, batch_size=2, alpha_ce=1.0, steps=8)
    with pytest.raises(ValueError) as e:
        pt.pretrain(*_options(teacher, corpus, cache, out, resume=True, **changed))
    message = str(e.value)
    for flag in ("--lr 0.005 -> 0.001", "--temperature 2.0 -> 4.0", "--batch-size 4 -> 2", "--alpha-ce 5.0 -> 1.0"):
        assert flag in message
    assert "--steps" not in message  # allowed
    assert (out / "run.json").read_bytes() == record


def test_resume_with_more_steps_runs_the_schedule_over_the_new_total(finished, teacher, corpus, cache, tmp_path,
                                                                     capsys):  # fmt: skip
    out = _copy(finished, tmp_path)
    report = pt.pretrain(*_options(teacher, corpus, cache, out, resume=True, steps=8, log_every=2))
    printed = capsys.readouterr().out
    assert "resuming" in printed and "at step 4 with changed options: --steps 4 -> 8; --log-every 1 -> 2" in printed
    lines = [x for x in _lines(out) if "loss" in x]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 6, 8]
    # Steps 5-8 follow the 8-step schedule (warmup ceil(0.25 * 8) = 2 steps done long ago), not a restarted one.
    assert [x["lr"] for x in lines[4:]] == [lr_at(s, 8, 2, 5e-3) for s in (5, 7)]
    saved = json.loads((out / "run.json").read_text())
    assert saved["optim"]["steps"] == 8 and saved["run"]["log_every"] == 2
    assert saved["resumed"] == [{"step": 4, "changed": {"optim.steps": [4, 8], "run.log_every": [1, 2]}}]
    assert report["steps"] == 8
    with pytest.raises(ValueError, match="--steps 6: .* has trained 8 steps already"):
        pt.pretrain(*_options(teacher, corpus, cache, out, resume=True, steps=6, log_every=2))


# ---- 3. leftovers: temporaries, duplicated metric lines, the two-rename gap, fsync -----------------------------------


def test_a_start_removes_stale_temporaries_and_resume_cuts_metrics_back(teacher, corpus, cache, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    """What a `kill -9` at step 6, after the step-4 checkpoint, leaves: metric lines past step 4, a half-written
    last line and a `.checkpoint.tmp-*` (a whole checkpoint at real size)."""
    out = tmp_path / "run"
    real = pt.release_replaced  # called after each checkpoint: keep a copy of the step-4 one

    def keep_step_4(path):
        if not (tmp_path / "step4").exists():
            shutil.copytree(out / "checkpoint", tmp_path / "step4")
        real(path)

    monkeypatch.setattr(pt, "release_replaced", keep_step_4)
    pt.pretrain(*_options(teacher, corpus, cache, out, steps=6, save_every=4))
    reference = _untimed(_lines(out))
    shutil.rmtree(out / "checkpoint")
    os.rename(tmp_path / "step4", out / "checkpoint")
    shutil.copytree(out / "checkpoint", out / f".checkpoint.tmp-{_dead_pid()}-0123abcd")
    (out / "report.json").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lr": 0.00')  # killed mid-write
    assert [x["step"] for x in reference] == [1, 2, 3, 4, 5, 6] and len(stale_temporaries(out)) == 1
    pt.pretrain(*_options(teacher, corpus, cache, out, steps=6, save_every=4, resume=True))
    lines = _untimed(_lines(out))
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert lines == reference  # and steps 5-6 redone exactly
    assert _leftovers(out) == []


def test_resume_finds_a_checkpoint_cut_between_the_two_renames(finished, teacher, corpus, cache, tmp_path):
    """Without renameat2's exchange, a save renames checkpoint/ away, then the new one in: a kill between the two
    leaves no checkpoint/. The next start puts the (complete) new one in place and resumes from it."""
    out = _copy(finished, tmp_path)
    (out / "report.json").unlink()  # an unfinished run: killed in its last save
    pid = _dead_pid()
    new = out / f".checkpoint.tmp-{pid}-0badc0de"
    shutil.copytree(out / "checkpoint", new)
    os.rename(out / "checkpoint", out / f".checkpoint.old-{pid}-0badc0de")
    pt.pretrain(*_options(teacher, corpus, cache, out, resume=True))
    assert (out / "report.json").is_file() and _leftovers(out) == []
    assert [x["step"] for x in _lines(out) if "loss" in x] == [1, 2, 3, 4]


def test_run_records_and_reports_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spying(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spying)
    write_json(tmp_path / "run.json", {"a": 1})
    assert any(Path(p).name.startswith(".run.json.tmp-") for p in synced)  # the data, before the rename
    assert str(tmp_path) in synced  # the rename itself


# ---- 4. a folder without a checkpoint is not a run ------------------------------------------------------------------


def test_a_failed_start_leaves_nothing_and_the_rerun_starts_afresh(teacher, corpus, cache, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("too short")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="0 usable sequences"):
        pt.pretrain(*_options(teacher, notes, cache, out))
    assert not out.exists()  # no run.json, no student_init/
    # Ctrl-C in setup through the CLI: exit 130, one quiet line, nothing behind.
    argv = _argv(teacher, corpus, cache, out, "--steps", "2")
    real = pt.find_sources  # the data files' checks, the first look at the corpus

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    pt.find_sources = interrupted
    try:
        assert cli.main(argv) == 130
    finally:
        pt.find_sources = real
    assert capsys.readouterr().err.strip() == "interrupted" and not out.exists()
    # A start killed in its first save (what `kill -9` leaves: run.json, student_init/, a temporary): neither a plain
    # rerun nor --resume sends the user to the other; both start afresh.
    for flags in ((), ("--resume",)):
        out.mkdir()
        write_json(out / "run.json", {"run": {"out": str(out)}})
        (out / "student_init").mkdir()
        (out / f".checkpoint.tmp-{_dead_pid()}-00c0ffee").mkdir()
        assert cli.main(argv + list(flags)) == 0
        assert (out / "report.json").is_file() and _leftovers(out) == []
        shutil.rmtree(out)


def test_resume_of_a_finished_run_says_so_and_rewrites_nothing(finished, teacher, corpus, cache, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    monkeypatch.setattr(pt, "evaluate_mlm", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    report = pt.pretrain(*_options(teacher, corpus, cache, out, resume=True))
    assert report == json.loads(before["report.json"])
    assert "holds a finished run (4 steps): nothing to resume" in capsys.readouterr().out
    assert _snapshot(out) == before


def test_a_folder_in_use_is_refused(finished, teacher, corpus, cache, tmp_path):
    out = _copy(finished, tmp_path)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another `distill` process holds it
        with pytest.raises(FileExistsError, match="in use by another distill process"):
            pt.pretrain(*_options(teacher, corpus, cache, out, resume=True))
    finally:
        os.close(fd)


# ---- 5. errors are one line: a full disk, a bad config, anything else ------------------------------------------------


@pytest.mark.parametrize("kind", ["torch", "safetensors"])
def test_a_full_disk_at_a_save_is_one_line_with_the_space_needed(tmp_path, monkeypatch, kind):
    """What torch and safetensors raise on a full disk (seen on a 1 MB tmpfs), through the checkpoint save."""
    model = torch.nn.Linear(100, 100)
    if kind == "torch":
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(loop, "save_model", lambda *a, **k: None)
        monkeypatch.setattr(loop.torch, "save", lambda *a, **k: (_ for _ in ()).throw(error))
        monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: SimpleNamespace(free=512))
    else:
        from safetensors import SafetensorError

        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(loop, "save_model", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(OSError) as e:
        loop.save_checkpoint(tmp_path / "checkpoint", model, None, {"w": model.weight})
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert str(e.value).startswith(f"disk full while writing the checkpoint to {tmp_path / 'checkpoint'}: it needs")
    if kind == "torch":  # the model's tensors (40,400 bytes) and the trainer state's (its 40,000-byte weight)
        assert "it needs about 80.4 KB and 512 B is free there" in str(e.value)
    assert "--resume" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint went with the failure


def test_a_real_full_disk_ends_in_one_line_and_leaves_no_start(teacher, corpus, cache, tmp_path, capsys):
    """A 6 MB tmpfs holds run.json and student_init/ (2 MB) but not a checkpoint (7 MB): the first save fails."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        code = cli.main(_argv(teacher, corpus, cache, disk / "run", "--steps", "2"))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"distill pretrain: error: disk full while writing the checkpoint to {disk / 'run'}")
        assert re.search(r"it needs about [\d.]+ MB and [\d.]+ MB is free there", err)
        assert not (disk / "run").exists()  # the start that never reached a checkpoint is cleared
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"optim": {"lr": "fast"}}, r"config: lr \(--lr\) must be a number, got 'fast'"),
        ({"batch_size": "eight"}, r"config: batch_size \(--batch-size\) must be a whole number, got 'eight'"),
        ({"optim": {"steps": 2.5}}, r"config: steps \(--steps\) must be a whole number, got 2.5"),
        ({"run": {"progress": "no"}}, r"config: progress \(--progress\) must be true or false, got 'no'"),
    ],
)
def test_config_values_of_the_wrong_type_are_one_line(tmp_path, capsys, content, match):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(content))
    assert cli.main(["pretrain", "--config", str(cfg), "--teacher", "t", "--data", "d", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and err.count("\n") == 1


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(cli.COMMANDS[0], "run", broken)
    assert cli.main(["pretrain", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "distill pretrain: error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (--debug shows the "
        "traceback)\n"
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["--debug", "pretrain", "--out", str(tmp_path)])


# ---- 6. silent nonsense refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over, match",
    [
        ({"alpha_ce": -1.0}, r"--alpha-ce must be ≥ 0"),
        ({"alpha_ce": 0.0, "alpha_cos": 0.0, "alpha_mlm": -1.0}, r"--alpha-mlm must be ≥ 0"),
        ({"temperature": float("nan")}, r"--temperature must be > 0"),
        ({"mask_replace": 0.8, "random_replace": 0.3}, r"--mask-replace 0.8 \+ --random-replace 0.3 exceed 1"),
        ({"max_seq_len": 100}, r"--max-seq-len 100 exceeds a model's position table \(64 positions\)"),
    ],
)
def test_nonsense_options_are_refused_before_any_work(teacher, corpus, cache, tmp_path, monkeypatch, over, match):
    monkeypatch.setattr(pt, "build_store", lambda *a, **k: pytest.fail("tokenized before the check"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        pt.pretrain(*_options(teacher, corpus, cache, out, **over))
    assert not out.exists()


def test_a_binary_file_named_txt_is_refused(teacher, corpus, cache, tmp_path):
    elf = tmp_path / "data" / "notes.txt"
    elf.parent.mkdir()
    shutil.copy(os.path.realpath(sys.executable), elf)  # an ELF executable
    assert elf.read_bytes()[:4] == b"\x7fELF"
    for data in (elf, elf.parent):  # the file itself, or in a folder of .txt files
        with pytest.raises(ValueError, match=rf"{re.escape(str(elf))} is not a text file \(it holds NUL bytes"):
            pt.pretrain(*_options(teacher, data, cache, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_teacher_scoring_zero_gives_no_share(finished, capsys):
    report = json.loads((finished / "report.json").read_text())
    assert report["teacher"]["mlm_accuracy"] < runs.SCORE_FLOOR
    assert report["student_keeps_of_teacher_accuracy"] is None
    assert runs.kept_share(0.0139, 1e-9) is None and runs.kept_share(0.45, 0.5) == pytest.approx(0.9)


# ---- the crash test --------------------------------------------------------------------------------------------------


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll `condition` every 5 ms until it holds (True) or the process ends or time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            if condition():
                return True
        except (OSError, ValueError):  # a file caught mid-rename or mid-write
            pass
        time.sleep(0.005)
    return False


def _logged(out: Path) -> int:
    return sum(1 for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x)


def test_kill_9_at_random_points_then_resume_is_bit_identical(teacher, corpus, cache, tmp_path):
    """4 `kill -9`s of `python -m engine pretrain --save-every 1`, the first in the very first save (no checkpoint
    yet), the others at a random moment after one more step: each followed by `--resume`, the last run to the end.
    The student, the optimizer state and the metric lines equal those of an uninterrupted run."""
    t0 = time.monotonic()
    steps = ["--steps", "8", "--save-every", "1"]
    reference = tmp_path / "reference"
    assert cli.main(_argv(teacher, corpus, cache, reference, *steps)) == 0

    out = tmp_path / "crashed"
    argv = [sys.executable, "-m", "engine", *_argv(teacher, corpus, cache, out, *steps, "--resume")]
    rng = random.Random(2024)
    kills = []
    for i in range(4):
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if i == 0:
            hit = _wait_for(proc, lambda: any(p.name.startswith(".checkpoint.tmp-") for p in out.iterdir()))
        else:
            done = _logged(out)
            hit = _wait_for(proc, lambda done=done: _logged(out) > done)
            time.sleep(rng.uniform(0.0, 0.4))
        in_save = any(p.name.startswith(".checkpoint.tmp-") for p in out.iterdir())
        proc.kill()
        _, err = proc.communicate()
        assert hit, f"run {i} ended before the kill: {err.decode()[-2000:]}"
        kills.append(f"step {_logged(out)}{' in a save' if in_save else ''}")
    final = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    seconds = time.monotonic() - t0
    print(f"{len(kills)} kills ({', '.join(kills)}), {seconds:.0f} s in all")

    _assert_same_weights(_weights(out / "student"), _weights(reference / "student"))
    got = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    want = torch.load(reference / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert got["step"] == want["step"] == 8
    for i, moments in want["optimizer"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(got["optimizer"]["state"][i][k], v), (i, k)
    lines = _untimed(_lines(out))
    assert [x["step"] for x in lines] == list(range(1, 9))  # no step twice, none missing
    assert lines == _untimed(_lines(reference))
    assert _leftovers(out) == []


def test_making_the_student_leaves_the_random_stream_alone(tmp_path, minilm_dir):
    """A run that makes its student from the teacher's layers and one given that same student draw the same dropout
    and masks: making it (a model built with random init, then overwritten) consumes nothing of the global RNG."""
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    made = runs.student_checkpoint("", minilm_dir, tmp_path, "distilbert")
    assert (made / "config.json").is_file()
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
    assert runs.student_checkpoint(str(made), minilm_dir, tmp_path, "distilbert") == made

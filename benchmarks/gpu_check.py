"""GPU proof in one prepared call: correctness of every compiled kernel configuration, then the headline figures.

    python -m benchmarks.gpu_check                     # on a CUDA machine: ≤ 7 minutes, JSON into benchmarks/results/
    python -m benchmarks.gpu_check --budget-s 300      # a tighter budget: lower-value items are skipped, and say so
    python -m benchmarks.gpu_check --dry-run --out /tmp/x   # the same code on the CPU: tiny shapes, < 1 minute

One process, one command, written for a GPU that is lent for ~15 minutes now and then (nothing kept between loans).
Items run in order of value; before each one the remaining budget is checked against its expected cost, and an item
that errors is recorded with its message and the run goes on. The JSON is rewritten (atomically) after every item,
so whatever stops the run leaves a file: at the budget a SIGALRM stops the running item ("skipped: budget"), and a
watchdog thread writes the JSON, prints the table and exits 3 if the main thread is stuck past budget + grace (a
hung kernel). The exit code is 1 if any correctness check failed or errored, else 0.

What it proves, in order (expected time on an H100 with a cold Triton cache, from compile counts; replace these with
the first recorded run's `phases`):

0. environment (~10 s): device, driver, torch/triton/transformers/liger versions, commit; the device-to-device copy
   bandwidth (1 GiB) and the bf16 matmul rate (4096³–16384³) measured now, with their spread: every prediction below
   is made from these two numbers.
1. compiled correctness (~150 s, bounded at 45% of the budget for its background part):
   - allocator poisoning self-test: after `poison_allocator`, fresh CUDA allocations of 4 KiB–48 MiB read 0xFF (NaN)
     everywhere, so an output element a kernel never writes cannot pass;
   - in the background, child processes (compiles run in parallel): every launch configuration that
     `kernels._tiles.row_tiles` can pick (one width per (BLOCK_N, BLOCK, num_warps, one tile or looping)) for each
     of distill_loss, cross_entropy (label smoothing, reduction='none', per-row upstream gradient), kd_loss (T = 1,
     upstream 1), softmax, log_softmax and cosine_loss, in bf16, fp32 and fp16; and `pytest -q -m gpu tests`;
   - in this process, real shapes: distill_loss at N = 16384 for V ∈ {30522, 50265, 128256} × {bf16, fp16, fp32},
     the other ops at N = 16384 and BERT/RoBERTa/Llama-3 widths; fused_linear_distill_loss (bf16, fp32) and
     fused_linear_cross_entropy against fp64 with the Cut-Cross-Entropy rule (|ours − truth| ≤ |torch in the same
     dtype − truth| + slack); the fused head's `max_memory_allocated` bound (chunk budget + O(V·H + N·H), independent
     of N); no host sync in distill_loss or the fused head (`torch.cuda.set_sync_debug_mode("error")`).
   Every check: fresh random inputs (never zeros), outputs poisoned, forward and backward, every element compared
   with an fp64 truth (`benchmarks.correctness`); a NaN never passes.
2. headline figures, side by side in this process (~150 s, most of it `torch.compile`'s warm-up): median and IQR of
   CUDA-event-timed runs after warm-up, L2 flushed before each run:
   - KD+CE forward+backward at N = 16384, V = 30522, bf16: ours, eager PyTorch, `torch.compile`, Liger-Kernel (when
     its wheel is installed; "absent" otherwise), in ms and GB/s against the copy bandwidth (floor: read s, read t,
     write the gradient), plus our memory beyond inputs and gradient;
   - LM-head-fused KD+CE at N = 16384, H = 768, V = 30522, bf16: time and peak memory, ours vs the unfused path
     (and Liger's fused-linear JSD when installed);
   - the end-to-end DistilBERT step (BERT-base teacher → 6-layer student, batch 64 × seq 128, bf16), ours vs
     `transformers` eager: tokens/s, MFU against the matmul rate measured in step 0, peak memory.
   Each figure is stored beside its prediction from bytes (÷ copy bandwidth) and FLOPs (÷ matmul rate), so a miss
   of a DESIGN.md target is explained by which side ran slower than its model.
3. report (~5 s): `targets` (each DESIGN.md target: value, threshold, met, by how much it is missed), the JSON in
   `--out` (default `benchmarks/results/`, dry runs `benchmarks/results/cpu/`), `benchmarks/RESULTS.md` regenerated
   from every recorded GPU run (GPU runs into the default folder only; a dry run renders `RESULTS.md` next to its
   JSON instead), and a short table printed last.

The oracle (fp64 truths, the every-element checker, poisoning, the ops and launch configurations) lives in
`benchmarks/correctness.py`; the measurements, their models and the targets in `benchmarks/gpu_figures.py`; this
module holds the plan, the budget, the order of items, the JSON and the table.

`--dry-run` hides any GPU, sets TRITON_INTERPRET=1 before `kernels` is imported, and runs every item above on tiny
shapes (`DRY_PLAN`); items that need CUDA (poisoning, memory bounds, sync checks, `torch.compile`, Liger) record why
they were skipped, and the `gpu` tests are collected, not run. CI runs it (tests/test_gpu_check.py).
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import correctness, record, report
from benchmarks.gpu_figures import (
    HEADLINES,
    ceilings,
    clean,
    free,
    free_quietly,
    headline_distill,
    headline_e2e,
    headline_fused,
    peak_memory,
    sync,
    targets,
)

SCHEMA = 1
REPO = Path(__file__).resolve().parents[1]
REQUIRED_FIELDS = ("kind", "schema", "command", "dry_run", "status", "exit_code", "datetime", "elapsed_s", "budget_s",
                   "device", "ceilings", "plan", "phases", "checks", "gpu_tests", "headlines", "targets", "summary",
                   "results_md")  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """Every shape and repetition count of one run: `GPU_PLAN` on CUDA, `DRY_PLAN` for --dry-run."""

    rows: int  # N of the real-shape checks and of the KD+CE and fused headlines
    vocabs: tuple[int, ...]  # V of the real-shape checks; the first is the headlines'
    hidden: tuple[int, ...]  # H of the cosine checks; the first is the fused head's
    dtypes: tuple[str, ...]  # real-shape dtypes, the headline dtype first
    sweep_dtypes: tuple[str, ...]  # dtypes of the configuration sweep
    fused_memory_rows: tuple[int, int]  # two N for the fused head's memory bound (its peak must not grow with N)
    e2e_shape: tuple[int, int] | None  # (batch, seq len); None: test_bench_e2e's first shape of seq len 128
    warmup: int  # untimed runs before timing (torch.compile compiles in the first)
    reps: int  # timed runs of each kernel provider
    e2e_reps: int  # timed steps of each end-to-end contender
    background_fraction: float  # of the budget, at most, for the sweep and the gpu tests


GPU_PLAN = Plan(16384, (30522, 50265, 128256), (768, 1024, 4096), ("bfloat16", "float16", "float32"),
                ("bfloat16", "float32", "float16"), (2048, 16384), None, 3, 20, 10, 0.45)  # fmt: skip
DRY_PLAN = Plan(5, (300, 1100, 4500), (64, 48), ("bfloat16", "float16", "float32"), ("bfloat16",), (16, 64), None,
                1, 2, 1, 0.6)  # fmt: skip


class BudgetExceeded(BaseException):
    """Raised in the main thread by SIGALRM when the budget (less the report's reserve) is spent."""


class Interrupted(BaseException):
    """Raised in the main thread by SIGTERM / SIGINT: stop, write what there is."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---- the run: budget, items, JSON ---------------------------------------------------------------------------------


class Run:
    """The budget, the JSON document, and `item()`, which runs one unit of work in order of value."""

    def __init__(self, args, plan: Plan, device: str):
        self.args, self.plan, self.device = args, plan, device
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        self.reserve = min(15.0, 0.1 * args.budget_s)  # kept for the report at the end
        self.stopped: str | None = None  # set when the budget is spent or the run interrupted: the rest is skipped
        self.lock = threading.RLock()
        self.children: list[subprocess.Popen] = []
        self.tmpdirs: list[Path] = []
        self.data = {k: None for k in REQUIRED_FIELDS}
        self.data.update(
            kind="gpu_check", schema=SCHEMA, command=" ".join(["python -m benchmarks.gpu_check", *args.argv]),
            dry_run=args.dry_run, status="running", datetime=_now(), budget_s=args.budget_s, plan=asdict(plan),
            phases={}, checks=[], gpu_tests={"status": "pending"}, headlines={k: {"status": "pending"} for k in
            HEADLINES}, targets=[], ceilings={}, device={},
        )  # fmt: skip
        slug = "cpu" if device == "cpu" else record.device_slug()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        self.path = Path(args.out) / f"gpu-check-{slug}-{stamp}.json"

    # -- time
    def remaining(self) -> float:
        return self.deadline - self.reserve - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- JSON
    def write(self) -> None:
        """Atomically replace the JSON file with the current document (retried if another thread mutates it)."""
        # SIGALRM waits until the file is replaced (it would leave a temporary file behind); the watchdog thread
        # has it blocked already.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            self._write()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _write(self) -> None:
        with self.lock:
            self.data["elapsed_s"] = round(self.elapsed(), 2)
            for _ in range(5):
                try:
                    text = dumps(self.data)
                    break
                except RuntimeError:  # a dict changed size while the watchdog serialized it: try again
                    time.sleep(0.01)
            else:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".gpu-check-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)

    # -- items
    def item(self, name: str, phase: str, fn: Callable[[], dict], est_s: float = 0.0, into: str = "checks") -> dict:
        """Run fn() (returning a dict with a "status") as one recorded item, unless the budget cannot cover `est_s`.

        `into`: "checks" appends the record to the list of checks, "gpu_tests" stores it as `gpu_tests`, a headline
        name under `headlines`.
        """
        rec = {"name": name, "phase": phase, "status": "running", "seconds": None}
        with self.lock:
            if into == "checks":
                self.data["checks"].append(rec)
            elif into == "gpu_tests":
                self.data["gpu_tests"] = rec
            else:
                self.data["headlines"][into] = rec
        est = est_s if self.device == "cuda" else 0.0
        if self.stopped:
            rec["status"] = f"skipped: {self.stopped}"
        elif self.remaining() < est:
            rec["status"] = f"skipped: budget (needs ~{est:.0f} s, {max(self.remaining(), 0):.0f} s left)"
        else:
            self.write()
            t0 = time.perf_counter()
            try:
                result = fn() or {}
                rec.update(result)
                rec.setdefault("status", "pass")
            except BudgetExceeded:
                self.stopped = "budget"
                rec["status"] = f"skipped: budget (stopped after {time.perf_counter() - t0:.1f} s)"
            except Interrupted:
                self.stopped = "interrupted"
                rec["status"] = "skipped: interrupted"
            except Exception as e:
                rec["status"] = "error"
                rec["message"] = f"{type(e).__name__}: {e}"[:2000]
                rec["traceback"] = traceback.format_exc()[-3000:]
                if torch.cuda.is_available():
                    free_quietly()
            rec["seconds"] = round(time.perf_counter() - t0, 3)
        self.write()
        print(f"[{self.elapsed():6.1f}s] {rec['status'][:60]:<12} {name}", flush=True)
        return rec

    # -- children
    def spawn(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, **kw)
        self.children.append(p)
        return p

    def kill_children(self) -> None:
        for p in self.children:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the child's own session: it and what it started
                except OSError:
                    pass


def dumps(data: dict) -> str:
    """The document as JSON: indented, except that each check is one line (hundreds of them, diffable)."""
    dump = lambda v, **kw: json.dumps(v, default=_json_default, allow_nan=False, ensure_ascii=False, **kw)  # noqa: E731
    items = []
    for key, value in data.items():
        if key == "checks" and isinstance(value, list):
            body = "[\n" + ",\n".join("  " + dump(c) for c in value) + "\n ]" if value else "[]"
        else:
            body = dump(value, indent=1).replace("\n", "\n ")
        items.append(f" {dump(key)}: {body}")
    return "{\n" + ",\n".join(items) + "\n}\n"


def _json_default(x):
    if isinstance(x, torch.dtype):
        return correctness.dtype_name(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return repr(x)


# ---- phase 0: environment ------------------------------------------------------------------------------------------


def environment(run: Run) -> dict:
    info = record.device_info(measure=False)
    if not info.get("commit") and os.environ.get("GPU_CHECK_COMMIT"):
        # A copy of the work tree without .git (a lent GPU machine): the caller names the commit it copied.
        dirty = {"0": False, "false": False, "1": True, "true": True}.get(os.environ.get("GPU_CHECK_DIRTY", "").lower())
        info.update(commit=os.environ["GPU_CHECK_COMMIT"], commit_source="$GPU_CHECK_COMMIT", dirty=dirty)
    liger = importlib.util.find_spec("liger_kernel") is not None
    info["liger_kernel"] = "installed" if liger else "absent"
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    run.data["device"] = clean(info)
    return {"status": "pass", "name_of_device": info.get("name")}


# ---- phase 1: correctness -----------------------------------------------------------------------------------------


class Background:
    """The configuration sweep (child processes, so Triton compiles in parallel) and `pytest -m gpu tests`, run while
    this process checks the real shapes; both are stopped at `deadline` (wall clock)."""

    def __init__(self, run: Run, deadline: float):
        self.run, self.deadline = run, deadline
        self.dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        run.tmpdirs.append(self.dir)
        self.heuristic: dict = {}
        self.workers: list[tuple[subprocess.Popen, Path, Path, list[str]]] = []  # process, results, log, its checks
        self.tests: subprocess.Popen | None = None
        self.tests_log = self.dir / "pytest.log"
        self.tests_t0 = time.monotonic()

    def start(self) -> dict:
        plan = self.run.plan
        jobs = []
        for dtype_name in plan.sweep_dtypes:
            configs, err = correctness.tile_configs(correctness.DTYPES[dtype_name])
            self.heuristic[dtype_name] = {"configs": len(configs), "error": err}
            for op in correctness.SWEEP_OPS:
                jobs.append({"op": op, "dtype": dtype_name, "configs": configs})
        cpus = os.cpu_count() or 2
        n_workers = max(1, min(len(jobs), cpus // 2, 8))
        for w in range(n_workers):
            mine = jobs[w::n_workers]
            # Workers stop starting configurations a little before the deadline, so that they end on their own.
            spec = {"deadline": self.deadline - min(10.0, 0.05 * self.run.args.budget_s), "jobs": mine}
            jobs_path, out_path = self.dir / f"jobs{w}.json", self.dir / f"sweep{w}.jsonl"
            jobs_path.write_text(json.dumps(spec))
            cmd = [sys.executable, "-m", "benchmarks.correctness", str(jobs_path), str(out_path)]
            log_path = self.dir / f"worker{w}.log"
            with open(log_path, "w") as log:
                proc = self.run.spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
            names = [f"sweep/{j['op']}/{j['dtype']}/w={c['width']}" for j in mine for c in j["configs"]]
            self.workers.append((proc, out_path, log_path, names))
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               "--continue-on-collection-errors"]  # fmt: skip
        if self.run.device == "cuda":
            cmd.append("tests")
        else:
            # Without CUDA they would only be skipped: collect them (the files that mark any), which proves they import.
            marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                            if "mark.gpu" in p.read_text(errors="replace"))  # fmt: skip
            cmd += ["--collect-only", *(marked or ["tests"])]
        self.tests_t0 = time.monotonic()
        with open(self.tests_log, "w") as log:
            self.tests = self.run.spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
        return {
            "status": "pass",
            "workers": n_workers,
            "jobs": len(jobs),
            "configurations": self.heuristic,
            "planned_checks": sum(len(w[3]) for w in self.workers),
            "deadline_in_s": round(self.deadline - time.time(), 1),
        }

    def _wait(self, procs: list[subprocess.Popen]) -> bool:
        """Wait for procs until the deadline; kill those still running then. True if all finished."""
        while any(p.poll() is None for p in procs):
            if time.time() > self.deadline:
                for p in procs:
                    if p.poll() is None:
                        try:
                            os.killpg(p.pid, signal.SIGKILL)  # our child's own session
                        except OSError:  # it ended in between
                            pass
                        p.wait()
                return False
            time.sleep(0.2)
        return True

    def join_sweep(self) -> dict:
        """Every planned sweep check into `checks`: its record, or why there is none (deadline, or a crashed child)."""
        finished = self._wait([w[0] for w in self.workers])
        counts, crashed = {"pass": 0, "fail": 0, "error": 0, "skipped": 0}, {}
        for proc, out, log, names in self.workers:
            got = {}
            for line in out.read_text().splitlines() if out.exists() else []:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                got[r["name"]] = r
            rc = proc.returncode
            if rc not in (0, -signal.SIGKILL):  # died on its own: its unfinished checks are errors, not skips
                crashed[str(proc.pid)] = {"returncode": rc, "log_tail": log.read_text(errors="replace")[-2000:]}
            missing = ({"status": "error", "message": f"sweep worker exited with {rc} (see the sweep item's log)"}
                       if str(proc.pid) in crashed else {"status": "skipped: budget (sweep deadline)"})  # fmt: skip
            with self.run.lock:
                for name in names:
                    r = got.get(name) or {"name": name, "phase": "correctness", **missing}
                    self.run.data["checks"].append(r)
                    counts[r["status"] if r["status"] in counts else "skipped"] += 1
        status = (
            "fail"
            if counts["fail"] or counts["error"]
            else "pass"
            if not counts["skipped"]
            else ("skipped: budget (sweep deadline)")
        )
        return {"status": status, "finished": finished, **counts, "crashed_workers": crashed}

    def join_tests(self) -> dict:
        finished = self._wait([self.tests])
        out = self.tests_log.read_text(errors="replace") if self.tests_log.exists() else ""
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed)", out)}
        collected = len([line for line in out.splitlines() if "::" in line and not line.startswith("ERROR")])
        res = {"command": " ".join(self.tests.args[1:]), "returncode": self.tests.returncode, "counts": counts,
               "pytest_seconds": round(time.monotonic() - self.tests_t0, 1), "output_tail": out[-4000:]}  # fmt: skip
        if not finished:
            res["status"] = "skipped: budget (pytest stopped at the deadline)"
        elif self.run.device != "cuda":
            # Collected, not run: a collection error here is CI's to report (it runs these files), not a GPU result.
            res["status"] = "skipped: no CUDA (collected only)"
            res["collected"] = collected
        elif self.tests.returncode == 0:
            res["status"] = "pass"
        elif self.tests.returncode == 5:  # no test selected
            res["status"] = "skipped: no gpu-marked test collected"
        else:
            res["status"] = "fail"
        return res


def real_shape_cases(plan: Plan) -> list[tuple[str, str, int, int, float]]:
    """(op, dtype, N, width, label fraction) of the real-shape checks, most valuable first."""
    n, (v0, v1, v2), dts = plan.rows, plan.vocabs, plan.dtypes
    cases = [("distill", dt, n, v, 0.15) for dt in dts for v in (v0, v1, v2)]
    cases += [("cross_entropy", dt, n, v1, 0.15) for dt in dts]
    cases += [("kd_loss", dt, n, v0, 0.15) for dt in dts]
    cases += [("softmax", dt, n, v0, 0.15) for dt in dts]
    cases += [("log_softmax", dts[0], n, v2, 0.15)]
    cases += [("cosine", dt, n, plan.hidden[0], 0.15) for dt in dts]
    cases += [("cosine", dts[0], n, h, 0.15) for h in plan.hidden[1:]]
    return cases


def check_real(run: Run, op: str, dtype: str, n: int, width: int, fraction: float) -> dict:
    r = correctness.check_op(op, correctness.DTYPES[dtype], n, width, run.device, seed=1, label_fraction=fraction)
    free()
    return r


def _fused_inputs(n, h, v, dtype, device, seed=0):
    """Student rows/weight/bias requiring grad, teacher's constant, 15% labels, as the fused benchmark draws them."""
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *shape, scale=1.0: correctness._randn(shape, dtype, device, g, scale)  # noqa: E731
    s = [rn(n, h).requires_grad_(), rn(v, h, scale=h**-0.5).requires_grad_(), rn(v, scale=0.1).requires_grad_()]
    t = [rn(n, h), rn(v, h, scale=h**-0.5), rn(v, scale=0.1)]
    y = correctness._labels(n, v, device, g, 0.15)
    return s, t, y


def _fused_loss(s, t, y, how: str, ce_only: bool, chunk: int | None = None):
    """KD (T = 2, α 5, batchmean) + CE (α 2, mean over labelled rows), or CE alone, through the vocab projections,
    forward and backward; returns the loss. "ours": fused; "torch": unfused as a user writes it (projection in the
    inputs' dtype, losses in fp32); "fp64": unfused in fp64, `chunk` rows at a time (each chunk's share of both
    means, its backward accumulating into the leaves), so that no fp64 [N, V] tensor is ever whole."""
    import torch.nn.functional as F

    import kernels

    T, kw, cw = correctness.TEMPERATURE, correctness.KD_WEIGHT, correctness.CE_WEIGHT
    if how == "ours":
        loss = (kernels.fused_linear_cross_entropy(*s, y) if ce_only else
                kernels.fused_linear_distill_loss(*s, *t, y, None, T, kw, cw).loss)  # fmt: skip
        loss.backward()
        return loss.detach()
    acc = torch.float64 if how == "fp64" else torch.float32
    n, n_ce = y.shape[0], (y != -100).sum().clamp_min(1)
    total = torch.zeros((), dtype=acc, device=y.device)
    for start in range(0, n, chunk or n):
        rows = slice(start, min(start + (chunk or n), n))
        zs = F.linear(s[0][rows], s[1], s[2]).to(acc)
        loss = F.cross_entropy(zs, y[rows], ignore_index=-100, reduction="sum") / n_ce * (1.0 if ce_only else cw)
        if not ce_only:
            zt = F.linear(t[0][rows], t[1], t[2]).to(acc)
            kd = F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), reduction="sum", log_target=True)
            loss = loss + kw * T * T * kd / n
        loss.backward()
        total += loss.detach()
    return total


def check_fused(run: Run, dtype_name: str, ce_only: bool = False) -> dict:
    """The fused head against fp64 by the Cut-Cross-Entropy rule: |ours − truth| ≤ |torch in dtype − truth| + slack."""
    dtype = correctness.DTYPES[dtype_name]
    n, h, v = run.plan.rows, run.plan.hidden[0], run.plan.vocabs[0]
    slack = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}[dtype]
    s, t, y = _fused_inputs(n, h, v, dtype, run.device)
    results = {}
    for how in ("fp64", "torch", "ours"):
        if how == "fp64":  # fp64 leaves: the truth's gradients must not be rounded back to the inputs' dtype
            leaves = [x.detach().double().requires_grad_() for x in s]
            args = (leaves, [x.double() for x in t])
        else:
            leaves = s
            args = (s, t)
            for x in s:
                x.grad = None
        if how == "ours":
            correctness.poison_allocator(3 * n * v * 4)
        chunk = max(1, correctness.CHUNK_ELEMENTS // (4 * v)) if how == "fp64" else None
        loss = _fused_loss(*args, y, how, ce_only, chunk)
        results[how] = [loss.double(), *(x.grad.double() for x in leaves)]
        del loss, leaves, args
        free()
    outputs, ok = {}, True
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight", "grad_bias")):
        truth, theirs, ours = results["fp64"][i], results["torch"][i], results["ours"][i]
        e_theirs = float((theirs - truth).abs().max())
        e_ours = (ours - truth).abs().max()
        e_ours = math.inf if e_ours.isnan() else float(e_ours)
        bound = e_theirs + slack * max(float(truth.abs().max()), 1e-30)
        good = e_ours <= bound and bool(torch.isfinite(ours).all())
        ok &= good
        outputs[name] = {"ok": good, "err_ours": e_ours, "err_torch": e_theirs, "bound": bound, "n": ours.numel()}
    del results, s, t, y
    free()
    return clean(
        {
            "status": "pass" if ok else "fail",
            "shape": [n, h, v],
            "dtype": dtype_name,
            "outputs": outputs,
            "rule": "|ours − fp64| ≤ |torch unfused in dtype − fp64| + slack·max|fp64|",
            "slack": slack,
        }
    )


def fused_memory_bound(run: Run) -> dict:
    """Peak of the fused head ≤ 2·chunk budget + 6·V·H·4 + 4·N·H·4 bytes, and growing by O(N·H) only with N."""
    if run.device != "cuda":
        return {"status": "skipped: no CUDA (max_memory_allocated)"}
    import kernels

    h, v, budget = run.plan.hidden[0], run.plan.vocabs[0], 256 * 2**20

    def peak(n: int) -> float:
        s, t, y = _fused_inputs(n, h, v, torch.bfloat16, "cuda")
        fn = lambda: kernels.fused_linear_distill_loss(*s, *t, y, memory_budget_bytes=budget).loss.backward()  # noqa: E731
        return peak_memory(fn)["peak_MB"] * 2**20

    peaks = {}
    for n in run.plan.fused_memory_rows:
        peaks[n] = peak(n)
        free()
    (n0, n1) = run.plan.fused_memory_rows
    bound = {n: 2 * budget + 6 * v * h * 4 + 4 * n * h * 4 for n in peaks}
    growth_bound = (n1 - n0) * h * 4 * 4
    ok = all(peaks[n] <= bound[n] for n in peaks) and peaks[n1] - peaks[n0] <= growth_bound
    unfused_logits = n1 * v * 2 * 2  # the two bf16 [N, V] logits an unfused head would hold, for scale
    return {"status": "pass" if ok else "fail", "peak_MB": {str(n): p / 2**20 for n, p in peaks.items()},
            "bound_MB": {str(n): b / 2**20 for n, b in bound.items()}, "growth_MB": (peaks[n1] - peaks[n0]) / 2**20,
            "growth_bound_MB": growth_bound / 2**20, "unfused_logits_MB": unfused_logits / 2**20,
            "shape": {"H": h, "V": v, "dtype": "bfloat16", "memory_budget_bytes": budget}}  # fmt: skip


def no_host_sync(run: Run) -> dict:
    """distill_loss and the fused head forward + backward under torch.cuda.set_sync_debug_mode("error")."""
    if run.device != "cuda":
        return {"status": "skipped: no CUDA (sync debug mode)"}
    import kernels

    n, v, h = run.plan.rows, run.plan.vocabs[0], run.plan.hidden[0]

    def distill():
        x = correctness.OPS["distill"].make(n, v, torch.bfloat16, "cuda", torch.Generator("cuda").manual_seed(0))
        return lambda: kernels.distill_loss(x["s"], x["t"], x["y"], x["m"], 2.0, 5.0, 2.0).loss.backward()

    def fused():
        s, t, y = _fused_inputs(n, h, v, torch.bfloat16, "cuda")
        return lambda: kernels.fused_linear_distill_loss(*s, *t, y).loss.backward()

    found = {}
    for name, make in (("distill_loss", distill), ("fused_linear_distill_loss", fused)):
        fn = make()
        sync()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            found[name] = None
        except RuntimeError as e:
            found[name] = str(e)[:500]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        del fn
        free()
    return {"status": "pass" if not any(found.values()) else "fail", "syncs": found}


# ---- phase 3: targets, summary, table ---------------------------------------------------------------------------


def summary(data: dict) -> dict:
    checks = data.get("checks") or []
    tests = data.get("gpu_tests") or {}
    statuses = [c.get("status", "") for c in checks] + [tests.get("status", "")]
    s = {"checks": len(checks) + 1, "passed": statuses.count("pass"), "failed": statuses.count("fail"),
         "errors": statuses.count("error"), "skipped": sum(x.startswith("skipped") for x in statuses),
         "running": statuses.count("running")}  # fmt: skip
    s["correctness_ok"] = s["failed"] == 0 and s["errors"] == 0
    s["failures"] = [c["name"] for c in checks if c.get("status") in ("fail", "error")][:50]
    if tests.get("status") == "fail":
        s["failures"].append("gpu tests")
    return s


def _fmt(v, unit="", digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}g}{unit}"


def table(data: dict, path: Path | None = None) -> str:
    """The short summary printed last: status, correctness counts, each headline figure with its prediction."""
    dev = data.get("device") or {}
    s = data.get("summary") or summary(data)
    lines = [
        f"== gpu_check {data.get('status')} · {dev.get('name', '?')} · {data.get('elapsed_s', 0):.0f} s of "
        f"{data.get('budget_s'):.0f} · commit {(dev.get('commit') or '?')[:10]}{' (dirty)' if dev.get('dirty') else ''}"
        f"{' · DRY RUN (CPU, interpreter)' if data.get('dry_run') else ''}",
        f"correctness: {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped"
        f"{' — OK' if s['correctness_ok'] else ' — FAILED: ' + ', '.join(s['failures'][:8])}",
        f"{'figure':<44} {'median ms':>10} {'±IQR/2':>7} {'pred ms':>9} {'meas/pred':>9} {'figure':>22}",
    ]
    for h in HEADLINES:
        hl = (data.get("headlines") or {}).get(h) or {}
        shape = "×".join(str(x) for x in (hl.get("shape") or {}).values())
        if not hl.get("providers"):
            lines.append(f"{h + ' ' + shape:<44} {hl.get('status', '')}")
            continue
        for p, e in hl["providers"].items():
            label = f"{h} {p} {shape}"[:44]
            if e.get("status") != "measured":
                lines.append(f"{label:<44} {e.get('status', '')[:70]}")
                continue
            fig = (
                f"{e['GB_per_s']:.0f} GB/s"
                if "GB_per_s" in e
                else f"{e['tokens_per_s']:.3g} tok/s"
                if "tokens_per_s" in e
                else f"{e['TFLOP_per_s']:.3g} TFLOP/s"
                if "TFLOP_per_s" in e
                else ""
            )
            if "peak_MB" in e:
                fig += f" {e['peak_MB']:.0f} MB"
            half = e["iqr_ms"] / 2 / e["median_ms"] if e.get("median_ms") else None
            lines.append(
                f"{label:<44} {_fmt(e.get('median_ms')):>10} {_fmt(half and 100 * half, '%', 2):>7} "
                f"{_fmt(e.get('predicted_ms')):>9} {_fmt(e.get('measured_over_predicted')):>9} {fig:>22}"
            )
    lines.append("targets (DESIGN.md):")
    for t in data.get("targets") or []:
        met = {True: "met", False: "MISSED", None: "—"}[t.get("met")]
        lines.append(
            f"  {t['what'][:62]:<62} {_fmt(t.get('value')):>8} {t['target']:>7} {met:>6}"
            f"{'  ' + t['miss'] if t.get('miss') else ''}{'  (' + t['why'] + ')' if t.get('why') else ''}"
        )
    if path:
        lines.append(f"JSON: {path}")
    if data.get("results_md"):
        lines.append(f"RESULTS.md: {data['results_md']}")
    return "\n".join(lines)


def finish(run: Run, status: str) -> int:
    """Targets, summary, status and exit code into the document, and the document to its file."""
    with run.lock:
        for rec in [*run.data["checks"], run.data["gpu_tests"], *run.data["headlines"].values()]:
            if rec.get("status") in ("running", "pending"):  # cut off by the budget between its start and its end
                rec["status"] = f"skipped: {run.stopped or 'not reached'}"
        run.data["targets"] = targets(run.data)
        run.data["summary"] = summary(run.data)
        run.data["status"] = status
        code = 0 if run.data["summary"]["correctness_ok"] else 1
        run.data["exit_code"] = code
    run.write()
    return code


def regenerate_results(run: Run) -> str:
    """benchmarks/RESULTS.md from every recorded GPU run (GPU runs recorded in the default folder only); a dry run
    renders RESULTS.md next to its own JSON, exercising the generator without touching the committed file."""
    if run.args.dry_run or run.device != "cuda":
        out = run.path.parent / "RESULTS.md"
        report.main([str(run.path), "--out", str(out), "--no-plots"])
        return str(out)
    if run.path.parent.resolve() == report.RESULTS_DIR.resolve():
        report.main([])
        return str(report.RESULTS_MD)
    return f"not regenerated: {run.path.parent} is not {report.RESULTS_DIR}"


# ---- main -----------------------------------------------------------------------------------------------------------


def _stall(run: Run, spec: str) -> dict:
    """--debug-stall MODE:SECONDS (tests): "sleep" stalls interruptibly (SIGALRM stops it), "hang" with SIGALRM
    blocked, as a hung kernel would hold the main thread (only the watchdog can end it)."""
    mode, seconds = spec.split(":")
    if mode == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(float(seconds))
    return {"status": "pass"}


def phases(run: Run) -> None:
    plan = run.plan
    bg_deadline = time.time() + plan.background_fraction * run.args.budget_s - run.elapsed()

    def phase(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            run.data["phases"][name] = {"seconds": round(time.perf_counter() - t0, 2)}

    def env():
        run.item("environment", "environment", lambda: environment(run))
        if run.args.debug_stall:
            run.item("debug stall", "environment", lambda: _stall(run, run.args.debug_stall))
        run.item("ceilings: copy bandwidth and matmul rate", "environment", lambda: ceilings(run), est_s=5)

    def correct():
        run.item("poison self-test", "correctness", correctness.poison_selftest, est_s=2)
        bg = Background(run, bg_deadline)
        started = run.item("background: configuration sweep and gpu tests", "correctness", bg.start, est_s=5)
        for op, dt, n, w, frac in real_shape_cases(plan):
            run.item(f"real/{op}/{dt}/N={n}/W={w}", "correctness", lambda a=(op, dt, n, w, frac): check_real(run, *a),
                     est_s=4)  # fmt: skip
        for dt in plan.dtypes[:1] + ("float32",):
            run.item(f"fused/distill/{dt}", "correctness", lambda dt=dt: check_fused(run, dt), est_s=8)
        run.item(f"fused/cross_entropy/{plan.dtypes[0]}", "correctness",
                 lambda: check_fused(run, plan.dtypes[0], ce_only=True), est_s=6)  # fmt: skip
        run.item("fused/memory bound", "correctness", lambda: fused_memory_bound(run), est_s=6)
        run.item("no host sync", "correctness", lambda: no_host_sync(run), est_s=4)
        if started.get("status") == "pass":
            run.item("sweep: every launch configuration", "correctness", bg.join_sweep)
            run.item("gpu tests: pytest -q -m gpu tests", "correctness", bg.join_tests, into="gpu_tests")
        else:
            run.data["gpu_tests"] = {"status": f"skipped: background not started ({started.get('status')})"}
        run.kill_children()

    def headlines():
        run.item("KD+CE side by side", "headlines", lambda: headline_distill(run), est_s=20, into="distill")
        run.item("fused head vs unfused", "headlines", lambda: headline_fused(run), est_s=20, into="fused_linear")
        run.item("end-to-end step", "headlines", lambda: headline_e2e(run), est_s=40, into="e2e")

    for name, fn in (("environment", env), ("correctness", correct), ("headlines", headlines)):
        try:
            phase(name, fn)
        except BudgetExceeded:
            run.stopped = "budget"
        except Interrupted:
            run.stopped = "interrupted"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON (default benchmarks/results/; dry runs benchmarks/results/cpu/)",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, kernels in Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget in seconds (default 420)")
    parser.add_argument("--grace-s", type=float, default=30.0, help="watchdog: exit this long after the budget")
    parser.add_argument("--debug-stall", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    if args.out is None:
        args.out = report.RESULTS_DIR / "cpu" if args.dry_run else report.RESULTS_DIR
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.dry_run:
        # Hide any GPU and run the kernels in Triton's interpreter; both before CUDA or `kernels` is touched.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: the figures are GPU figures (pass --dry-run to check the code path on the CPU)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    torch.manual_seed(0)
    run = Run(args, plan, device)
    run.write()
    print(f"gpu_check: {'dry run on the CPU' if args.dry_run else device}, budget {args.budget_s:.0f} s, "
          f"JSON {run.path}", flush=True)  # fmt: skip

    def watchdog():
        # The main thread is stuck past budget + grace (a hung kernel or sync): write what there is and leave.
        with run.lock:
            for c in run.data["checks"]:
                if c.get("status") == "running":
                    c["status"] = "skipped: budget (stuck at the watchdog)"
            for h in run.data["headlines"].values():
                if h.get("status") in ("running", "pending"):
                    h["status"] = "skipped: budget (watchdog)"
        run.kill_children()
        for d in run.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        finish(run, "partial: watchdog")
        print(table(run.data, run.path), flush=True)
        os._exit(3)

    def on_alarm(signum, frame):
        raise BudgetExceeded()

    def on_term(signum, frame):
        raise Interrupted()

    timer = threading.Timer(max(0.0, args.budget_s + args.grace_s - run.elapsed()), watchdog)
    timer.daemon = True
    # The watchdog thread inherits a mask that blocks SIGALRM, so the alarm interrupts the main thread's work.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    timer.start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, run.remaining()))
    try:
        phases(run)
    except (BudgetExceeded, Interrupted) as e:
        run.stopped = run.stopped or ("budget" if isinstance(e, BudgetExceeded) else "interrupted")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        run.kill_children()
        for d in run.tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
    status = "complete" if not run.stopped else f"partial: {run.stopped}"
    code = finish(run, status)
    try:
        run.data["results_md"] = regenerate_results(run)
    except Exception as e:
        run.data["results_md"] = f"error: {type(e).__name__}: {e}"
    run.write()
    timer.cancel()
    print(table(run.data, run.path), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/gpu_check.py and its oracle benchmarks/correctness.py, without a GPU: the dry run end to end (its JSON
has every field, the committed RESULTS.md is left alone), the budget stop and the watchdog (each leaves a partial
JSON), the every-element checker against wrong, NaN and never-written outputs, and the gpu_check section of the
RESULTS.md generator on a synthetic GPU run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from benchmarks import correctness, gpu_check, gpu_figures, report

REPO = Path(__file__).resolve().parents[1]


def dry_run(out: Path, *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m benchmarks.gpu_check --dry-run --out out ...` in a child process; its result and its one JSON."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    files = list(out.glob("gpu-check-*.json"))
    assert len(files) == 1, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc, json.loads(files[0].read_text())


def assert_every_field(data: dict) -> None:
    assert set(gpu_check.REQUIRED_FIELDS) <= set(data)
    assert data["kind"] == "gpu_check" and data["schema"] == gpu_check.SCHEMA and data["dry_run"] is True
    assert set(data["headlines"]) == set(gpu_figures.HEADLINES)
    assert [t["name"] for t in data["targets"]] == [t[0] for t in gpu_figures.TARGETS]
    for t in data["targets"]:
        assert {"what", "target", "threshold", "value", "predicted", "met", "miss"} <= set(t)
    assert {"checks", "passed", "failed", "errors", "skipped", "correctness_ok", "failures"} <= set(data["summary"])
    for c in data["checks"]:
        assert {"name", "phase", "status"} <= set(c), c
    assert "status" in data["gpu_tests"]


def test_dry_run_writes_every_field(tmp_path):
    results_md = (REPO / "benchmarks" / "RESULTS.md").read_text()
    results_before = sorted(p.name for p in (REPO / "benchmarks" / "results").glob("*.json"))

    proc, data = dry_run(tmp_path)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_every_field(data)
    assert data["status"] == "complete" and data["exit_code"] == 0 and data["summary"]["correctness_ok"]
    assert data["device"]["type"] == "cpu" and data["device"]["triton_interpret"] is True
    assert data["device"]["versions"]["torch"] == torch.__version__ and "commit" in data["device"]
    assert data["ceilings"]["copy"]["GB_per_s"] > 0 and data["ceilings"]["matmul"]["TFLOP_per_s"] > 0
    assert set(data["phases"]) == {"environment", "correctness", "headlines"}

    names = [c["name"] for c in data["checks"]]
    statuses = {c["name"]: c["status"] for c in data["checks"]}
    for prefix in ("real/distill/", "real/cross_entropy/", "real/kd_loss/", "real/softmax/", "real/log_softmax/",
                   "real/cosine/", "fused/distill/", "fused/cross_entropy/", "sweep/"):  # fmt: skip
        assert any(n.startswith(prefix) for n in names), prefix
    # every configuration the launch heuristic picks, for every op of the sweep, checked and passed
    for op in correctness.SWEEP_OPS:
        for dtype in gpu_check.DRY_PLAN.sweep_dtypes:
            configs, err = correctness.tile_configs(correctness.DTYPES[dtype])
            assert err is None
            for c in configs:
                assert statuses[f"sweep/{op}/{dtype}/w={c['width']}"] == "pass"
    for name in ("poison self-test", "fused/memory bound", "no host sync"):
        assert statuses[name].startswith("skipped: no CUDA")  # said, not silently dropped
    assert data["gpu_tests"]["status"] == "skipped: no CUDA (collected only)" and data["gpu_tests"]["collected"] > 0

    for key in gpu_figures.HEADLINES:
        ours = data["headlines"][key]["providers"]["ours"]
        assert ours["status"] == "measured" and set(gpu_figures.PROVIDER_FIELDS) <= set(ours)
        assert ours["predicted_ms"] > 0 and ours["measured_over_predicted"] > 0
        assert data["headlines"][key]["providers"]["eager"]["status"] == "measured"
    providers = data["headlines"]["distill"]["providers"]
    assert providers["liger"]["status"] in ("absent", "skipped: Liger-Kernel needs CUDA")
    assert providers["compile"]["status"].startswith("skipped: torch.compile is measured on CUDA only")
    assert data["headlines"]["e2e"]["providers"]["ours"]["MFU"] > 0
    assert all(t["met"] is None for t in data["targets"])  # CPU figures are not measurements

    # The table comes last (often only the tail of the output is seen); RESULTS.md is rendered next to the JSON only.
    tail = proc.stdout.strip().splitlines()
    assert tail[-1] == f"RESULTS.md: {tmp_path / 'RESULTS.md'}" and tail[-2].startswith("JSON: ")
    assert any(line.startswith("== gpu_check complete") for line in tail[-40:])
    assert "## GPU checks" in (tmp_path / "RESULTS.md").read_text()
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == results_md
    assert sorted(p.name for p in (REPO / "benchmarks" / "results").glob("*.json")) == results_before


def test_budget_stop_writes_a_partial_json(tmp_path):
    proc, data = dry_run(tmp_path, "--budget-s", "3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # nothing failed: skipped is not failed
    assert_every_field(data)
    assert data["status"] == "partial: budget" and data["elapsed_s"] < 60
    skipped = [c for c in data["checks"] if c["status"].startswith("skipped: budget")]
    assert skipped and data["summary"]["skipped"] >= len(skipped)
    assert data["headlines"]["e2e"]["status"].startswith("skipped: budget")
    assert "== gpu_check partial: budget" in proc.stdout


def test_watchdog_writes_a_partial_json_when_the_main_thread_hangs(tmp_path):
    # The stall blocks SIGALRM, as a hung kernel holds the main thread: only the watchdog thread can end the run.
    proc, data = dry_run(tmp_path, "--budget-s", "2", "--grace-s", "1", "--debug-stall", "hang:120", timeout=100)
    assert proc.returncode == 3
    assert_every_field(data)
    assert data["status"] == "partial: watchdog"
    stall = next(c for c in data["checks"] if c["name"] == "debug stall")
    assert stall["status"] == "skipped: budget (stuck at the watchdog)"
    assert "== gpu_check partial: watchdog" in proc.stdout


# ---- the checker ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_checker_fails_wrong_nan_inf_and_unwritten_elements(dtype):
    truth = torch.randn(6, 37, dtype=torch.float64)
    good = truth.to(dtype)
    assert correctness.compare("x", good, truth)["ok"]

    wrong = good.clone()
    wrong[4, 11] += 0.05 * truth.abs().max().item()  # one element, 5% of the largest entry
    r = correctness.compare("x", wrong, truth)
    assert not r["ok"] and r["n_bad"] == 1 and r["worst_index"] == 4 * 37 + 11

    for bad in (float("nan"), float("inf")):
        x = good.clone()
        x[2, 3] = bad
        r = correctness.compare("x", x, truth)
        assert not r["ok"] and r["n_nonfinite"] == 1 and r["err_over_bound"] == "inf"

    # An element the kernel never wrote holds the poison: 0xFF bytes, NaN in every float dtype.
    unwritten = good.clone()
    unwritten.view(torch.uint8).view(-1)[: dtype.itemsize] = 0xFF
    assert unwritten.view(-1)[0].isnan()
    assert not correctness.compare("x", unwritten, truth)["ok"]

    # NaN in the truth fails too (the inputs are drawn so that it cannot happen), and so does a shape mismatch.
    t2 = truth.clone()
    t2[0, 0] = float("nan")
    assert not correctness.compare("x", good, t2)["ok"]
    assert not correctness.compare("x", good[:, 1:], truth)["ok"]


def test_checker_scales_to_zero_truths_and_chunks():
    zeros = torch.zeros(5, 3, dtype=torch.float64)
    tiny = torch.full((5, 3), 1e-7)
    assert not correctness.compare("g", tiny, zeros)["ok"]  # no tolerance at all around an exact 0 ...
    assert correctness.compare("g", tiny, zeros, noise=1.0)["ok"]  # ... unless fp32 noise of a unit coefficient
    truth = torch.randn(9, 40, dtype=torch.float64)
    c = correctness.Comparison("x", torch.float32)
    for rows in (slice(0, 4), slice(4, 9)):
        c.add(truth[rows].float(), truth[rows])
    assert c.ok and c.n == truth.numel()


def test_check_op_catches_a_wrong_kernel(monkeypatch):
    assert correctness.check_op("softmax", torch.float32, 5, 33, "cpu")["status"] == "pass"
    real = kernels.softmax

    def off_by_one_element(x, temperature=1.0):
        y = real(x, temperature)
        return y + torch.where(torch.arange(y.numel()).view(y.shape) == 7, 1e-3, 0.0)  # differentiable: dx stays

    monkeypatch.setattr(kernels, "softmax", off_by_one_element)
    r = correctness.check_op("softmax", torch.float32, 5, 33, "cpu")
    assert r["status"] == "fail" and not r["outputs"]["y"]["ok"] and r["outputs"]["dx"]["ok"]


def test_check_op_catches_an_unwritten_gradient_row(monkeypatch):
    real = kernels.distill_loss

    def forgets_a_row(s, *args):
        s.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), float("nan")))  # row 3 left as poison
        return real(s, *args)

    monkeypatch.setattr(kernels, "distill_loss", forgets_a_row)
    r = correctness.check_op("distill", torch.bfloat16, 6, 300, "cpu")
    assert r["status"] == "fail" and r["outputs"]["grad"]["n_nonfinite"] == 300 and r["outputs"]["loss"]["ok"]


def test_tile_configs_cover_each_launch_configuration_and_fail_soft(monkeypatch):
    from kernels._tiles import row_tiles

    configs, err = correctness.tile_configs(torch.bfloat16)
    assert err is None
    keys = {(c["BLOCK_N"], c["BLOCK"], c["num_warps"], c["single_tile"]) for c in configs}
    assert len(keys) == len(configs)  # one width per configuration
    every = {(*row_tiles(w, torch.bfloat16), w <= row_tiles(w, torch.bfloat16)[1]) for w in range(1, 20000, 7)}
    assert every <= keys  # nothing the heuristic can pick is missed
    assert any(not c["single_tile"] for c in configs)

    def moved(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(correctness.importlib, "import_module", moved)
    configs, err = correctness.tile_configs(torch.float32)
    assert [c["width"] for c in configs] == list(correctness.LADDER) and "row_tiles unusable" in err


# ---- targets and RESULTS.md ----------------------------------------------------------------------------------------


def _measured(**kw):
    return {"status": "measured", "median_ms": 1.0, "iqr_ms": 0.02, **kw}


def synthetic_gpu_check() -> dict:
    data = {k: None for k in gpu_check.REQUIRED_FIELDS}
    data.update(
        kind="gpu_check", schema=1, dry_run=False, status="complete", exit_code=0, datetime="2026-12-01T10:00:00+00:00",
        elapsed_s=380.0, budget_s=420.0, checks=[{"name": "real/distill/bfloat16/N=16384/W=30522", "status": "pass"},
        {"name": "sweep/kd_loss/float16/w=3", "status": "fail"}], gpu_tests={"status": "pass", "counts": {"passed": 4}},
        device={"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "driver": "550.1",
                "commit": "0123456789abcdef", "dirty": False, "versions": {"torch": "2.13.0", "triton": "3.9.0"}},
        ceilings={"copy": {"GB_per_s": 3000.0}, "matmul": {"TFLOP_per_s": 790.0}},
        headlines={
            "distill": {"status": "measured", "shape": {"N": 16384, "V": 30522, "dtype": "bfloat16"}, "providers": {
                "ours": _measured(median_ms=1.2, GB_per_s=2500.0, GB_per_s_of_copy=0.83, predicted_ms=1.0,
                                  measured_over_predicted=1.2, extra_of_logits=0.001, peak_MB=960.0),
                "eager": _measured(median_ms=3.6, predicted_ms=21.0, measured_over_predicted=0.17),
                "compile": _measured(median_ms=2.4, predicted_ms=1.7, measured_over_predicted=1.41),
                "liger": {"status": "absent"}}},
            "fused_linear": {"status": "measured", "providers": {"ours": _measured(median_ms=6.0, peak_MB=2000.0),
                                                                 "eager": _measured(median_ms=30.0, peak_MB=10000.0)}},
            "e2e": {"status": "skipped: budget"},
        },
    )  # fmt: skip
    data["targets"] = gpu_figures.targets(data)
    data["summary"] = gpu_check.summary(data)
    return data


def test_targets_say_what_is_met_and_by_how_much_it_is_missed():
    t = {x["name"]: x for x in synthetic_gpu_check()["targets"]}
    assert t["distill_of_copy"]["met"] is False and t["distill_of_copy"]["miss"] == "2% short of ≥ 0.85"
    assert t["distill_vs_eager"]["value"] == pytest.approx(3.0) and t["distill_vs_eager"]["met"] is False
    assert "ours 1.20×" in t["distill_vs_eager"]["why"] and "compile 1.41×" in t["distill_vs_eager"]["why"]
    assert t["distill_vs_compile"]["met"] is True and t["distill_vs_compile"]["miss"] is None
    assert t["distill_vs_liger"]["value"] is None and t["distill_vs_liger"]["met"] is None  # absent: no guess
    assert t["distill_extra_memory"]["met"] is True
    assert t["fused_memory"]["value"] == pytest.approx(0.2) and t["fused_memory"]["miss"] == "33% over ≤ 0.15"
    assert t["fused_vs_eager"]["value"] == pytest.approx(5.0) and t["fused_vs_eager"]["met"] is True
    assert t["e2e_mfu"]["met"] is None


def test_results_md_reports_gpu_checks(tmp_path):
    data = synthetic_gpu_check()
    assert data["summary"]["correctness_ok"] is False and data["summary"]["failures"] == ["sweep/kd_loss/float16/w=3"]
    path = tmp_path / "gpu-check-nvidia-h100-80gb-hbm3-20261201-100000.json"
    path.write_text(gpu_check.dumps(data))
    assert json.loads(path.read_text()) == json.loads(json.dumps(data))  # one line per check, still plain JSON
    (tmp_path / "cpu.json").write_text(json.dumps({**data, "dry_run": True, "device": {"type": "cpu"}}))

    assert report.discover(tmp_path) == []  # gpu_check files are not pytest-benchmark runs
    assert [c.path for c in report.discover_checks(tmp_path)] == [path]  # dry runs only when asked for
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert report.NO_GPU_RUN not in text and "## GPU checks (`python -m benchmarks.gpu_check`)" in text
    assert "NVIDIA H100 80GB HBM3 (sm 9.0, driver 550.1)" in text and "0123456789" in text
    assert "2 passed, 1 failed, 0 errors, 0 skipped — **failed**" in text and "`sweep/kd_loss/float16/w=3`" in text
    assert "| distill (N=16384, V=30522, dtype=bfloat16) | ours | 1.20 ±0.83% | 1.00 | 1.20× |" in text
    assert "| distill (N=16384, V=30522, dtype=bfloat16) | liger | absent |" in text
    assert "| e2e | — | skipped: budget |" in text
    row = next(line for line in text.splitlines() if line.startswith("| KD+CE fwd+bwd: speed vs eager PyTorch"))
    assert "| 3.00 | ≥ 4 | **no** | 25% short of ≥ 4 (measured ÷ predicted: ours 1.20×" in row

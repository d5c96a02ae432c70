"""benchmarks/report.py (and the JSON hook of benchmarks/conftest.py) on synthetic runs shaped like pytest-benchmark's
output plus our `machine_info['device']` and `extra_info`: no GPU needed."""

import json

import torch

from benchmarks import conftest as bench_conftest
from benchmarks import record, report

GPU = {
    "schema": 1,
    "type": "cuda",
    "name": "NVIDIA Test GPU",
    "capability": "9.0",
    "driver": "999.1",
    "versions": {"torch": "2.13.0", "triton": "3.9.0"},
    "commit": "0123456789abcdef",
    "dirty": False,
    "copy_GB_per_s": 3000.0,
    "matmul": {"TFLOP_per_s": 800.0, "dtype": "bfloat16", "source": "measured: best median of square matmuls"},
}
CPU = {**GPU, "type": "cpu", "name": "Test CPU", "capability": None, "driver": None}


def bench(group, provider, median_ms, iqr_ms=0.0, **extra):
    """One pytest-benchmark entry (only the fields the report reads, plus a few it ignores)."""
    return {
        "group": group,
        "name": f"test_x[{provider}-...]",
        "fullname": f"benchmarks/test_x.py::test_x[{provider}-...]",
        "params": {"provider": provider},
        "extra_info": extra,
        "options": {},
        "stats": {"median": median_ms / 1e3, "iqr": iqr_ms / 1e3, "rounds": 20, "min": 0.0, "max": 1.0},
    }


def write_run(path, device, benchmarks, when="2026-11-21T12:00:00+00:00"):
    data = {"machine_info": {"node": "x", "device": device}, "commit_info": {"id": "fedcba"}, "benchmarks": benchmarks,
            "datetime": when, "version": "5.3.1"}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def gpu_benchmarks():
    g = "distill-full-{}-bfloat16"
    return [
        bench(g.format("4096x30522"), "eager", 4.0, GB_per_s=600.0, peak_mem_MB=24.0),
        bench(g.format("4096x30522"), "compile", 2.0, GB_per_s=1200.0, peak_mem_MB=16.0),
        bench(g.format("4096x30522"), "liger", 3.0, GB_per_s=800.0, peak_mem_MB=20.0),
        bench(g.format("4096x30522"), "ours", 1.0, iqr_ms=0.1, GB_per_s=2700.0, peak_mem_MB=12.0),
        bench(g.format("16384x30522"), "eager", 16.0, peak_mem_MB=96.0),
        bench(g.format("16384x30522"), "ours", 4.0, peak_mem_MB=48.0),
        bench(g.format("4096x128256"), "eager", 16.0, peak_mem_MB=100.0),
        bench(g.format("4096x128256"), "ours", 2.0, peak_mem_MB=50.0),
        bench("e2e-step-64x128-bfloat16", "eager", 300.0, tokens_per_s=27000.0, MFU=0.2, peak_mem_MB=20480.0),
        bench("e2e-step-64x128-bfloat16", "ours", 100.0, tokens_per_s=81000.0, MFU=0.6, peak_mem_MB=8192.0),
        bench("fused_linear-forward-4096x768x30522-bfloat16", "ours", 2.0, TFLOP_per_s=400.0),
        bench("fused_linear-forward-4096x768x30522-float32", "ours", 8.0, TFLOP_per_s=100.0),
    ]


def table_rows(text, title):
    """The markdown table rows (header first) under the `### title` heading."""
    lines = text.split(f"### {title}\n", 1)[1].split("\n")[1:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_gpu_run_tables_ratios_and_plots(tmp_path):
    run = write_run(tmp_path / "nvidia-test-gpu-20261121.json", GPU, gpu_benchmarks())
    out = tmp_path / "RESULTS.md"
    assert report.main([str(run), "--out", str(out)]) == 0
    text = out.read_text()
    assert report.NO_GPU_RUN not in text
    assert "## Recorded runs" in text and "NVIDIA Test GPU (sm 9.0, driver 999.1)" in text
    assert "0123456789" in text and "| 3,000 |" in text and "800 bfloat16" in text

    rows = table_rows(text, "distill · full · bfloat16")
    header, body = rows[0], rows[2:]
    assert header == ["shape", "eager", "compile", "liger", "ours", "ours vs eager", "ours vs compile", "ours vs liger"]
    assert [r[0] for r in body] == ["N=4096, V=30522", "N=4096, V=128256", "N=16384, V=30522"]  # sorted by shape
    n4096 = dict(zip(header, body[0]))
    assert n4096["eager"] == "4.00 ms ±0%<br>600 GB/s (20% of copy)<br>peak 24.0 MB"
    assert n4096["ours"] == "1.00 ms ±5% · 4.00× eager<br>2,700 GB/s (90% of copy)<br>peak 12.0 MB"
    assert n4096["ours vs eager"] == "speed 4.00×<br>memory 0.50×"
    assert n4096["ours vs compile"] == "speed 2.00×<br>memory 0.75×"
    assert n4096["ours vs liger"] == "speed 3.00×<br>memory 0.60×"
    n16384 = dict(zip(header, body[2]))
    assert n16384["compile"] == n16384["liger"] == n16384["ours vs liger"] == "—"  # not run at this shape
    assert n16384["ours vs eager"] == "speed 4.00×<br>memory 0.50×"

    e2e = table_rows(text, "e2e · step · bfloat16")
    assert e2e[0] == ["shape", "eager", "ours", "ours vs eager"]
    cells = dict(zip(e2e[0], e2e[2]))
    assert cells["shape"] == "batch=64, seq_len=128"
    assert cells["eager"] == "300 ms ±0%<br>27.0k tok/s · MFU 20%<br>peak 20.0 GB"
    assert cells["ours"] == "100 ms ±0% · 3.00× eager<br>81.0k tok/s · MFU 60%<br>peak 8.00 GB"
    assert cells["ours vs eager"] == "speed 3.00×<br>memory 0.40×"
    assert text.index("### e2e") < text.index("### distill") < text.index("### fused_linear")

    fused = dict(zip(*[table_rows(text, "fused_linear · forward · bfloat16")[i] for i in (0, 2)]))
    assert fused["ours"] == "2.00 ms ±0%<br>400 TFLOP/s (50% of matmul)"
    fused = dict(zip(*[table_rows(text, "fused_linear · forward · float32")[i] for i in (0, 2)]))
    assert fused["ours"] == "8.00 ms ±0%<br>100 TFLOP/s"  # the measured peak is bf16's: no fp32 fraction

    plots = tmp_path / run.stem
    for name in ("distill-full-bfloat16-vs-N.png", "distill-full-bfloat16-vs-V.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({run.stem}/{name})" in text  # linked relative to RESULTS.md
    assert not list(plots.glob("e2e-*.png"))  # a single shape: nothing to plot against


def test_no_gpu_run_recorded(tmp_path):
    out = tmp_path / "RESULTS.md"
    assert report.main(["--results-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert report.NO_GPU_RUN in text and "## Recorded runs" not in text and "|" not in text

    # A CPU pipeline check in the results folder is not a measurement: left out unless asked for.
    write_run(tmp_path / "cpu.json", CPU, [bench("e2e-step-2x16-float32", "ours", 50.0)])
    assert report.main(["--results-dir", str(tmp_path), "--out", str(out)]) == 0
    assert out.read_text() == text
    assert report.main(["--results-dir", str(tmp_path), "--out", str(out), "--include-cpu", "--no-plots"]) == 0
    text = out.read_text()
    assert report.NO_GPU_RUN in text and "A CPU run" in text and "### e2e · step · float32" in text


def test_latest_run_per_device(tmp_path):
    old = write_run(tmp_path / "a.json", GPU, [bench("cosine-full-8x64-float32", "ours", 9.0)], "2026-01-01T00:00:00")
    new = write_run(tmp_path / "b.json", GPU, [bench("cosine-full-8x64-float32", "ours", 7.0)], "2026-02-01T00:00:00")
    text = report.render([report.load_run(old), report.load_run(new)], tmp_path / "RESULTS.md", plots=False)
    assert "[a.json](a.json)" in text and "[b.json](b.json)" in text  # both listed
    assert text.count("## NVIDIA Test GPU") == 1 and "(`b.json`)" in text
    assert "7.00 ms" in text and "9.00 ms" not in text


def test_parse_group():
    assert report.parse_group("distill-full-16384x30522-bfloat16") == (("distill", "full", "bfloat16"), (16384, 30522))
    assert report.parse_group("fused_linear-forward-4096x768x30522-float32") == (
        ("fused_linear", "forward", "float32"),
        (4096, 768, 30522),
    )
    assert report.parse_group("something-else") == (("something-else",), None)


def test_json_hook_names_dtypes_and_fractions():
    output = {
        "machine_info": {"device": GPU},
        "benchmarks": [
            {"params": {"dtype": torch.bfloat16}, "extra_info": {"GB_per_s": 1500.0}},
            {"params": {"dtype": torch.bfloat16}, "extra_info": {"TFLOP_per_s": 200.0}},
            {"params": {"dtype": torch.float32}, "extra_info": {"TFLOP_per_s": 200.0}},
            {"group": "e2e-step-64x128-bfloat16", "params": {}, "extra_info": {"TFLOP_per_s": 200.0, "MFU": 0.25}},
        ],
    }
    bench_conftest.pytest_benchmark_update_json(None, [], output)
    a, b, c, d = output["benchmarks"]
    assert a["params"]["dtype"] == "bfloat16" and a["extra_info"]["GB_per_s_of_copy"] == 0.5
    assert b["extra_info"]["TFLOP_per_s_of_matmul"] == 0.25
    assert "TFLOP_per_s_of_matmul" not in c["extra_info"]  # fp32 against a bf16 peak would mislead
    assert "TFLOP_per_s_of_matmul" not in d["extra_info"]  # the e2e MFU already is that fraction


def test_device_info_without_measuring():
    info = record.device_info(measure=False)
    assert info["type"] in ("cpu", "cuda") and info["versions"]["torch"] == torch.__version__
    assert {"name", "commit", "dirty", "versions", "schema"} <= set(info) and "matmul" not in info
    assert record.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"

"""Turn recorded benchmark runs (pytest-benchmark JSON) into benchmarks/RESULTS.md tables and PNG plots.

    python -m benchmarks.report                       # every GPU run in benchmarks/results/ (the latest per device)
    python -m benchmarks.report run1.json run2.json   # exactly these files (CPU runs included)

Benchmark groups are named `<op>-<mode>-<shape>-<dtype>` (e.g. `distill-full-16384x30522-bfloat16`,
`e2e-step-64x128-bfloat16`): each group holds one shape's providers. The report gathers the groups of one
(op, mode, dtype) into one table, a row per shape and a column per provider, and adds for each peer a column with
ours against it: speed = peer time / our time (above 1: ours is faster), memory = our peak / peer peak (below 1:
ours holds less). A provider cell reads

    median time ±half the interquartile range (relative), n× the eager time's speed
    GB/s (% of the device's measured copy bandwidth), or TFLOP/s (% of its measured matmul rate), or for the end-to-
    end step tokens/s and MFU
    peak memory (CUDA runs only)

Plots (time and peak memory against each shape dimension, one line per provider, log-log) go next to the JSON, in
`benchmarks/results/<run file name>/`. Without matplotlib the tables are written and the plots skipped.

Files written by `python -m benchmarks.gpu_check` (`"kind": "gpu_check"`) are reported first, in their own section:
every such run listed, and for the latest run of each device its correctness counts, each headline figure beside its
prediction, and each DESIGN.md target with whether it is met.
"""

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
# Providers in column order; any other provider follows, alphabetically. Peers are the providers that are not ours.
PROVIDER_ORDER = ["eager", "compile", "liger", "ours", "ours_compile"]
REFERENCE = "ours"
BASELINE = "eager"
MODE_ORDER = ["step", "forward", "backward", "full"]  # tables of one op in this order
# What each shape dimension is, per op, for the plots' axes.
DIM_NAMES = {
    "distill": ("N", "V"),
    "softmax": ("N", "V"),
    "cosine": ("N", "H"),
    "fused_linear": ("N", "H", "V"),
    "e2e": ("batch", "seq_len"),
}
_SHAPE = re.compile(r"^\d+(x\d+)*$")
NO_GPU_RUN = (
    "No GPU run is recorded yet: every figure of DESIGN.md's targets is still to be measured, and none is claimed "
    "here. Record one with `python -m benchmarks.run` on a CUDA machine (see benchmarks/README.md)."
)


@dataclass
class Result:
    family: tuple[str, ...]  # (op, mode, dtype), or (group,) for a group not named by the convention
    shape: tuple[int, ...] | None
    provider: str
    median_s: float
    iqr_s: float
    extra: dict


@dataclass
class Run:
    path: Path
    device: dict
    datetime: str
    commit: dict
    results: list[Result] = field(default_factory=list)

    @property
    def is_gpu(self) -> bool:
        return self.device.get("type") == "cuda"

    @property
    def name(self) -> str:
        return self.device.get("name") or "unknown device"


def parse_group(group: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """'distill-full-16384x30522-bfloat16' → (('distill', 'full', 'bfloat16'), (16384, 30522))."""
    parts = (group or "").split("-")
    if len(parts) == 4 and _SHAPE.match(parts[2]):
        op, mode, shape, dtype = parts
        return (op, mode, dtype), tuple(int(d) for d in shape.split("x"))
    return (group or "ungrouped",), None


def _provider(bench: dict) -> str:
    params = bench.get("params") or {}
    if "provider" in params:
        return str(params["provider"])
    m = re.search(r"\[([^-\]]+)", bench.get("name", ""))  # test_x[eager-...] → eager
    return m.group(1) if m else bench.get("name", "?")


def load_run(path: str | Path) -> Run:
    """Read one pytest-benchmark JSON file (with or without our `machine_info['device']`)."""
    path = Path(path)
    data = json.loads(path.read_text())
    machine = data.get("machine_info") or {}
    device = dict(machine.get("device") or {})
    if "name" not in device:  # a file written without benchmarks/conftest.py: only pytest-benchmark's own fields
        device["name"] = (machine.get("cpu") or {}).get("brand_raw") or machine.get("node") or "unknown device"
    commit = data.get("commit_info") or {}
    run = Run(path, device, data.get("datetime", ""), {"id": device.get("commit") or commit.get("id"),
              "dirty": device.get("dirty", commit.get("dirty"))})  # fmt: skip
    for bench in data.get("benchmarks", []):
        stats = bench.get("stats") or {}
        if "median" not in stats:
            continue
        family, shape = parse_group(bench.get("group"))
        run.results.append(
            Result(family, shape, _provider(bench), stats["median"], stats.get("iqr", 0.0), bench.get("extra_info", {}))
        )
    return run


# ---- formatting -----------------------------------------------------------------------------------------------------


def _num(v: float) -> str:
    """Three significant figures, without exponents for everyday magnitudes."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _ratio(v: float) -> str:
    """Ratios with two decimals (0.50×, 4.00×) so that columns of them line up; large ones as numbers."""
    return f"{v:.2f}" if 0.1 <= abs(v) < 100 else _num(v)


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{_num(v / div)}{suffix}"
    return _num(v)


def _mem(mb: float) -> str:
    return f"{_num(mb / 1024)} GB" if mb >= 1024 else f"{_num(mb)} MB"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"


def _providers(results: list[Result]) -> list[str]:
    present = {r.provider for r in results}
    known = [p for p in PROVIDER_ORDER if p in present]
    return known + sorted(present - set(known))


def _throughput(r: Result, device: dict) -> str | None:
    """tokens/s and MFU (end to end), else TFLOP/s, else GB/s, with the fraction of the device's measured ceiling.

    The fractions are the ones benchmarks/conftest.py stored; for files without them, GB/s is read against the
    device's copy bandwidth and TFLOP/s against its matmul peak when that peak was measured in the same dtype.
    """
    e = r.extra
    if "tokens_per_s" in e:
        text = f"{_si(e['tokens_per_s'])} tok/s"
        if "MFU" in e:
            text += f" · MFU {_pct(e['MFU'])}"
        return text
    if "TFLOP_per_s" in e:
        matmul = device.get("matmul") or {}
        frac = e.get("TFLOP_per_s_of_matmul")
        if frac is None and matmul.get("TFLOP_per_s") and r.family[-1] == matmul.get("dtype"):
            frac = e["TFLOP_per_s"] / matmul["TFLOP_per_s"]
        return f"{_num(e['TFLOP_per_s'])} TFLOP/s" + (f" ({_pct(frac)} of matmul)" if frac is not None else "")
    if "GB_per_s" in e:
        frac = e.get("GB_per_s_of_copy")
        if frac is None and device.get("copy_GB_per_s"):
            frac = e["GB_per_s"] / device["copy_GB_per_s"]
        return f"{_num(e['GB_per_s'])} GB/s" + (f" ({_pct(frac)} of copy)" if frac is not None else "")
    return None


def _cell(r: Result | None, baseline: Result | None, device: dict) -> str:
    if r is None:
        return "—"
    lines = [f"{_num(r.median_s * 1e3)} ms ±{_pct(r.iqr_s / 2 / r.median_s) if r.median_s else '?'}"]
    if baseline is not None and baseline is not r:
        lines[0] += f" · {_ratio(baseline.median_s / r.median_s)}× eager"
    throughput = _throughput(r, device)
    if throughput:
        lines.append(throughput)
    if "peak_mem_MB" in r.extra:
        lines.append(f"peak {_mem(r.extra['peak_mem_MB'])}")
    return "<br>".join(lines)


def _versus(ours: Result | None, peer: Result | None) -> str:
    if ours is None or peer is None:
        return "—"
    lines = [f"speed {_ratio(peer.median_s / ours.median_s)}×"]
    a, b = ours.extra.get("peak_mem_MB"), peer.extra.get("peak_mem_MB")
    if a is not None and b:
        lines.append(f"memory {_ratio(a / b)}×")
    return "<br>".join(lines)


def _family_order(family: tuple[str, ...]) -> tuple:
    """End to end first, then ops alphabetically, modes as in MODE_ORDER, dtypes alphabetically."""
    if len(family) != 3:
        return (2, family, 0, "")
    op, mode, dtype = family
    return (op != "e2e", op, MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), dtype)


def family_title(family: tuple[str, ...]) -> str:
    return " · ".join(family)


def _shape_label(shape: tuple[int, ...] | None, op: str) -> str:
    if shape is None:
        return "—"
    names = DIM_NAMES.get(op)
    if names and len(names) == len(shape):
        return ", ".join(f"{n}={d}" for n, d in zip(names, shape))
    return "x".join(map(str, shape))


def family_table(family: tuple[str, ...], results: list[Result], device: dict) -> str:
    """One markdown table: a row per shape, a column per provider, then ours against each peer."""
    providers = _providers(results)
    peers = [p for p in providers if not p.startswith(REFERENCE)] if REFERENCE in providers else []
    by_shape: dict = defaultdict(dict)
    for r in results:
        by_shape[r.shape][r.provider] = r
    header = ["shape", *providers, *(f"{REFERENCE} vs {p}" for p in peers)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for shape in sorted(by_shape, key=lambda s: s or ()):
        row = by_shape[shape]
        base = row.get(BASELINE)
        cells = [_shape_label(shape, family[0])]
        cells += [_cell(row.get(p), base, device) for p in providers]
        cells += [_versus(row.get(REFERENCE), row.get(p)) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------------------------------


def plot_family(family: tuple[str, ...], results: list[Result], out_dir: Path) -> list[Path]:
    """PNG files of time (and peak memory) against each shape dimension that varies; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    shaped = [r for r in results if r.shape is not None]
    if not shaped:
        return []
    ndim = len(shaped[0].shape)
    names = DIM_NAMES.get(family[0]) or tuple(f"d{i}" for i in range(ndim))
    if len(names) != ndim:
        names = tuple(f"d{i}" for i in range(ndim))
    providers = _providers(shaped)
    with_mem = any("peak_mem_MB" in r.extra for r in shaped)
    files = []
    for axis in range(ndim):
        if len({r.shape[axis] for r in shaped}) < 2:
            continue
        # One panel per value of the other dimensions, a line per provider across this one.
        panels: dict = defaultdict(list)
        for r in shaped:
            panels[r.shape[:axis] + r.shape[axis + 1 :]].append(r)
        keys = sorted(panels)
        rows = 2 if with_mem else 1
        fig, axes = plt.subplots(rows, len(keys), figsize=(4.5 * len(keys), 3.5 * rows), squeeze=False)
        for j, key in enumerate(keys):
            fixed = ", ".join(f"{n}={v}" for n, v in zip(names[:axis] + names[axis + 1 :], key))
            for i, p in enumerate(providers):
                pts = sorted(((r.shape[axis], r) for r in panels[key] if r.provider == p), key=lambda xr: xr[0])
                if not pts:
                    continue
                style = dict(marker="o", label=p, color=f"C{i}")  # one colour per provider in every panel
                axes[0][j].plot([x for x, _ in pts], [r.median_s * 1e3 for _, r in pts], **style)
                mem = [(x, r.extra["peak_mem_MB"]) for x, r in pts if "peak_mem_MB" in r.extra]
                if with_mem and mem:
                    axes[1][j].plot(*zip(*mem), **style)
            axes[0][j].set(title=fixed, xlabel=names[axis], ylabel="median time (ms)", xscale="log", yscale="log")
            if with_mem:
                axes[1][j].set(xlabel=names[axis], ylabel="peak memory (MB)", xscale="log", yscale="log")
            for row in axes:
                row[j].grid(True, which="both", alpha=0.3)
                row[j].legend(fontsize="small")
        fig.suptitle(family_title(family))
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{'-'.join(family)}-vs-{names[axis]}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


# ---- the document ---------------------------------------------------------------------------------------------------


def _run_row(run: Run, out_dir: Path) -> str:
    d = run.device
    v = d.get("versions") or {}
    what = run.name
    if d.get("capability"):
        what += f" (sm {d['capability']}"
        what += f", driver {d['driver']})" if d.get("driver") else ")"
    commit = (run.commit.get("id") or "?")[:10] + (" (dirty)" if run.commit.get("dirty") else "")
    bw = d.get("copy_GB_per_s")
    mm = d.get("matmul") or {}
    peak = f"{_num(mm['TFLOP_per_s'])} {mm.get('dtype', '')}, {mm.get('source', '')}" if mm.get("TFLOP_per_s") else "—"
    link = f"[{run.path.name}]({_rel(run.path, out_dir)})"
    cells = [link, what, run.datetime[:16].replace("T", " "), commit, v.get("torch") or "?", v.get("triton") or "?",
             _num(bw) if bw else "—", peak]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def _rel(path: Path, start: Path) -> str:
    try:
        return path.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def render(runs: list[Run], out: Path = RESULTS_MD, plots: bool = True, checks: list | None = None) -> str:
    """The RESULTS.md text for `runs` (the latest run of each device gets tables and plots) and gpu_check `checks`."""
    checks = checks or []
    out_dir = out.parent
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.report` from the JSON runs in `benchmarks/results/`; do not edit by hand.",
        "How to run the benchmarks and read these tables: `benchmarks/README.md`.",
        "",
    ]
    if not any(r.is_gpu for r in runs) and not any(c.is_gpu for c in checks):
        lines += [NO_GPU_RUN, ""]
    if checks:
        lines += render_checks(checks, out_dir)
    if not runs:
        return "\n".join(lines)
    lines += [
        "## Recorded runs",
        "",
        "| file | device | date (UTC) | commit | torch | triton | copy GB/s | matmul TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
        *(_run_row(r, out_dir) for r in sorted(runs, key=lambda r: r.datetime, reverse=True)),
        "",
    ]
    latest: dict[str, Run] = {}
    for run in sorted(runs, key=lambda r: r.datetime):
        latest[run.name] = run
    for run in sorted(latest.values(), key=lambda r: r.name):
        lines += [f"## {run.name} — {run.datetime[:10]} (`{run.path.name}`)", ""]
        if not run.is_gpu:
            lines += [
                "A CPU run: tiny shapes, our kernels in Triton's interpreter; it checks the benchmarks, it measures "
                "nothing worth comparing.",
                "",
            ]
        families: dict = defaultdict(list)
        for r in run.results:
            families[r.family].append(r)
        for family in sorted(families, key=_family_order):
            lines += [f"### {family_title(family)}", "", family_table(family, families[family], run.device), ""]
            if plots:
                for png in plot_family(family, families[family], run.path.parent / run.path.stem):
                    lines += [f"![{png.stem}]({_rel(png, out_dir)})", ""]
    lines += [
        "Cells: median time ±half the interquartile range (relative to the median) · speed relative to eager "
        "(eager time ÷ this time); then GB/s (% of the measured copy bandwidth), TFLOP/s (% of the measured matmul "
        "rate) or tokens/s and MFU; then peak memory. `ours vs X`: speed = X's time ÷ ours (above 1: ours is "
        "faster); memory = our peak ÷ X's (below 1: ours holds less). — : not run (skipped, or out of memory).",
        "",
    ]
    return "\n".join(lines)


def discover(results_dir: Path = RESULTS_DIR, include_cpu: bool = False) -> list[Run]:
    """Every pytest-benchmark run in `results_dir`; CPU runs (smoke checks, not measurements) with `include_cpu`."""
    runs = [load_run(p) for p in sorted(Path(results_dir).glob("*.json")) if not is_gpu_check(p)]
    return [r for r in runs if include_cpu or r.device.get("type") != "cpu"]


# ---- gpu_check runs -------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One `python -m benchmarks.gpu_check` file."""

    path: Path
    data: dict

    @property
    def device(self) -> dict:
        return self.data.get("device") or {}

    @property
    def is_gpu(self) -> bool:
        return self.device.get("type") == "cuda" and not self.data.get("dry_run")

    @property
    def name(self) -> str:
        return self.device.get("name") or "unknown device"

    @property
    def datetime(self) -> str:
        return self.data.get("datetime") or ""


def is_gpu_check(path: str | Path) -> bool:
    try:
        return json.loads(Path(path).read_text()).get("kind") == "gpu_check"
    except (OSError, ValueError, AttributeError):
        return False


def load_check(path: str | Path) -> Check:
    return Check(Path(path), json.loads(Path(path).read_text()))


def discover_checks(results_dir: Path = RESULTS_DIR, include_cpu: bool = False) -> list[Check]:
    """Every gpu_check file in `results_dir`; dry runs (CPU) only with `include_cpu`."""
    checks = [load_check(p) for p in sorted(Path(results_dir).glob("*.json")) if is_gpu_check(p)]
    return [c for c in checks if include_cpu or c.is_gpu]


def _ms(e: dict) -> str:
    if e.get("median_ms") is None:
        return "—"
    half = e.get("iqr_ms", 0) / 2 / e["median_ms"] if e["median_ms"] else 0
    return f"{_num(e['median_ms'])} ±{_pct(half)}"


def _figure(e: dict) -> str:
    parts = []
    if "GB_per_s" in e:
        parts.append(
            f"{_num(e['GB_per_s'])} GB/s"
            + (f" ({_pct(e['GB_per_s_of_copy'])} of copy)" if e.get("GB_per_s_of_copy") is not None else "")
        )
    if "tokens_per_s" in e:
        parts.append(f"{_num(e['tokens_per_s'] / 1e3)}k tok/s" + (f" · MFU {_pct(e['MFU'])}" if "MFU" in e else ""))
    elif "TFLOP_per_s" in e:
        parts.append(f"{_num(e['TFLOP_per_s'])} TFLOP/s")
    return "<br>".join(parts) or "—"


def _check_summary(c: Check) -> str:
    s = c.data.get("summary") or {}
    text = (f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('errors', 0)} errors, "
            f"{s.get('skipped', 0)} skipped")  # fmt: skip
    return text + ("" if s.get("correctness_ok") else " — **failed**")


def render_checks(checks: list[Check], out_dir: Path) -> list[str]:
    """The gpu_check section: every run listed; the latest per device in full."""
    lines = [
        "## GPU checks (`python -m benchmarks.gpu_check`)",
        "",
        "| file | device | date (UTC) | commit | torch | triton | status | correctness | copy GB/s | matmul TFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(checks, key=lambda c: c.datetime, reverse=True):
        d, v = c.device, c.device.get("versions") or {}
        ceil = c.data.get("ceilings") or {}
        bw, mm = (ceil.get("copy") or {}).get("GB_per_s"), (ceil.get("matmul") or {}).get("TFLOP_per_s")
        what = c.name + (f" (sm {d['capability']}, driver {d.get('driver') or '?'})" if d.get("capability") else "")
        what += " · dry run" if c.data.get("dry_run") else ""
        commit = (d.get("commit") or "?")[:10] + (" (dirty)" if d.get("dirty") else "")
        cells = [f"[{c.path.name}]({_rel(c.path, out_dir)})", what, c.datetime[:16].replace("T", " "), commit,
                 v.get("torch") or "?", v.get("triton") or "?", c.data.get("status") or "?", _check_summary(c),
                 _num(bw) if bw else "—", _num(mm) if mm else "—"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    latest: dict[str, Check] = {}
    for c in sorted(checks, key=lambda c: c.datetime):
        latest[c.name] = c
    for c in sorted(latest.values(), key=lambda c: c.name):
        lines += [f"### {c.name} — {c.datetime[:10]} (`{c.path.name}`)", ""]
        if not c.is_gpu:
            lines += ["A dry run (CPU, kernels in Triton's interpreter): it checks the code path only.", ""]
        tests = c.data.get("gpu_tests") or {}
        counts = ", ".join(f"{n} {k}" for k, n in (tests.get("counts") or {}).items())
        lines += [f"Correctness: {_check_summary(c)}; `pytest -m gpu tests`: {tests.get('status', '?')}"
                  + (f" ({counts})" if counts else "") + ".", ""]  # fmt: skip
        failures = (c.data.get("summary") or {}).get("failures") or []
        if failures:
            lines += ["Failed or errored: " + ", ".join(f"`{f}`" for f in failures) + ".", ""]
        lines += [
            "| headline | provider | median ms ±IQR/2 | predicted ms | measured ÷ predicted | figure | peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, h in (c.data.get("headlines") or {}).items():
            shape = ", ".join(f"{k}={v}" for k, v in (h.get("shape") or {}).items())
            label = f"{key} ({shape})" if shape else key
            providers = h.get("providers") or {}
            if not providers:
                lines.append(f"| {label} | — | {h.get('status', '?')} | | | | |")
            for p, e in providers.items():
                if e.get("status") != "measured":
                    lines.append(f"| {label} | {p} | {e.get('status', '?')} | | | | |")
                    continue
                mop = e.get("measured_over_predicted")
                peak = _mem(e["peak_MB"]) if e.get("peak_MB") is not None else "—"
                lines.append(
                    f"| {label} | {p} | {_ms(e)} | {_num(e.get('predicted_ms'))} | "
                    f"{_ratio(mop) + '×' if mop else '—'} | {_figure(e)} | {peak} |"
                )
        lines += [
            "",
            "| DESIGN.md target | value | target | met | miss (measured ÷ predicted) |",
            "|---|---|---|---|---|",
        ]
        for t in c.data.get("targets") or []:
            value = t.get("value")
            met = {True: "yes", False: "**no**", None: "—"}[t.get("met")]
            miss = " ".join(x for x in (t.get("miss"), f"({t['why']})" if t.get("why") else None) if x)
            shown = _num(value) if isinstance(value, (int, float)) else "—"
            lines.append(f"| {t.get('what')} | {shown} | {t.get('target')} | {met} | {miss} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="run or gpu_check JSON files (default: every GPU run in results/)")
    parser.add_argument("--out", type=Path, default=RESULTS_MD, help="markdown file to write")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where runs are found by default")
    parser.add_argument("--include-cpu", action="store_true", help="also report CPU runs found in --results-dir")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    if args.files:
        checks = [load_check(f) for f in args.files if is_gpu_check(f)]
        runs = [load_run(f) for f in args.files if not is_gpu_check(f)]
    else:
        runs = discover(args.results_dir, args.include_cpu)
        checks = discover_checks(args.results_dir, args.include_cpu)
    args.out.write_text(render(runs, args.out, plots=not args.no_plots, checks=checks))
    print(f"wrote {args.out} ({len(runs)} run(s), {len(checks)} gpu check(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

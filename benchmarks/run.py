"""Record one benchmark run: every suite, timed, saved as benchmarks/results/<device>-<UTC date>.json; then
rebuild benchmarks/RESULTS.md from every recorded GPU run.

    python -m benchmarks.run                           # all suites on this machine's GPU
    python -m benchmarks.run -k "e2e or distill"       # extra arguments go to pytest
    python -m benchmarks.run --allow-cpu -k e2e        # a CPU pipeline check (tiny shapes), kept out of the report

It is `pytest benchmarks --benchmark-only --benchmark-json=<file>` with the file named for you; pytest runs in a
child process so that the environment switches of the root conftest.py apply as in any pytest run.
"""

import argparse
import datetime
import subprocess
import sys

import torch

from benchmarks import record, report


def result_path(now: datetime.datetime | None = None):
    """benchmarks/results/<device slug>-<YYYYmmdd-HHMMSS>.json, in UTC.

    CPU runs go to benchmarks/results/cpu/, which the report does not read: they check the pipeline on tiny shapes
    and are not results to keep.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    folder = report.RESULTS_DIR if torch.cuda.is_available() else report.RESULTS_DIR / "cpu"
    return folder / f"{record.device_slug()}-{now:%Y%m%d-%H%M%S}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (into results/cpu/, unreported)")
    parser.add_argument("--no-report", action="store_true", help="do not rebuild benchmarks/RESULTS.md")
    args, pytest_args = parser.parse_known_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        parser.error("no CUDA device: the recorded figures are GPU figures (pass --allow-cpu for a pipeline check)")
    path = result_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", str(report.HERE), "--benchmark-only", f"--benchmark-json={path}",
               *pytest_args]  # fmt: skip
    print(" ".join(command), flush=True)
    rc = subprocess.call(command, cwd=report.HERE.parent)
    if not path.exists():
        print(f"pytest exited with {rc} and recorded nothing", file=sys.stderr)
        return rc or 1
    print(f"recorded {path}")
    if not args.no_report:
        report.main([])
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""What a benchmark run is measured on: the device, the software, the commit, and the device's own ceilings.

`device_info()` is stored in every result file (`benchmarks/conftest.py` puts it in pytest-benchmark's
`machine_info["device"]`) and gives the yardsticks that GB/s and TFLOP/s are read against:

    copy_GB_per_s   a device-to-device copy of a large buffer, (read + write bytes) / median time: the memory
                    bandwidth a memory-bound kernel can hope for (below the datasheet figure, which no copy reaches)
    matmul          the best median rate of large square matmuls in the benchmark dtype (bf16 on CUDA, fp32 on CPU):
                    the denominator of model-FLOPs utilization (MFU). `DISTILL_BENCH_PEAK_TFLOPS` replaces it with a
                    constant (e.g. a datasheet figure); the record says which was used.

Both are measured once per process, on first use, and cached: only runs that time something pay for them (under
`--benchmark-disable` pytest-benchmark saves no JSON and the e2e benchmark skips its MFU, so nothing is measured).
"""

import functools
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PEAK_ENV = "DISTILL_BENCH_PEAK_TFLOPS"
SCHEMA = 1  # version of the layout below; report.py reads this


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def commit_info() -> dict:
    """The commit the code was run at, and whether the tree differed from it (`dirty`).

    Untracked files count (a new benchmark not yet committed changes what ran), except under benchmarks/results/,
    where the run being recorded and its plots are written.
    """
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version: NVML when the `nvidia-ml-py` package is installed, else `nvidia-smi`.

    torch exposes only the CUDA driver API version (e.g. 12040), not the driver release (e.g. 550.54.15).
    """
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # not installed, or NVML unusable here: fall back to the CLI
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(fn, warmup: int, reps: int) -> float:
    """Median wall time of `fn()`; CUDA events on the GPU (no host overhead between launches), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int | None = None) -> float:
    """GB/s of a device-to-device copy: 2 × nbytes (read and write) over the median time.

    1 GiB on CUDA (far above any L2 cache, so HBM is what is measured); 64 MiB on CPU.
    """
    cuda = torch.cuda.is_available()
    nbytes = nbytes or (2**30 if cuda else 2**26)
    device = "cuda" if cuda else "cpu"
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), warmup=3, reps=20 if cuda else 5)
    return 2 * nbytes / seconds / 1e9


def measure_matmul_tflops(dtype: torch.dtype | None = None, sizes: tuple[int, ...] | None = None) -> dict:
    """TFLOP/s of square matmuls (2·n³ FLOPs each); the best size's median is the device's practical peak."""
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    sizes = sizes or ((4096, 8192, 16384) if cuda else (512, 1024))
    device = "cuda" if cuda else "cpu"
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        seconds = _median_seconds(lambda a=a, b=b: a @ b, warmup=3, reps=20 if cuda else 3)
        per_size[str(n)] = 2 * n**3 / seconds / 1e12
        del a, b
    return {
        "TFLOP_per_s": max(per_size.values()),
        "dtype": str(dtype).removeprefix("torch."),
        "source": "measured: best median of square matmuls n = " + ", ".join(per_size),
        "per_size": per_size,
    }


@functools.cache
def device_peaks() -> dict:
    """The device's measured copy bandwidth and matmul peak (or the `DISTILL_BENCH_PEAK_TFLOPS` constant), cached."""
    matmul = measure_matmul_tflops()
    if os.environ.get(PEAK_ENV):
        measured = matmul
        matmul = {
            "TFLOP_per_s": float(os.environ[PEAK_ENV]),
            "dtype": measured["dtype"],
            "source": f"constant from ${PEAK_ENV}",
            "measured": measured,  # kept for comparison with the constant
        }
    peaks = {"copy_GB_per_s": measure_copy_bandwidth(), "matmul": matmul}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the measurement buffers back before the benchmarks allocate theirs
    return peaks


@functools.cache
def _static_info() -> dict:
    cuda = torch.cuda.is_available()
    info = {
        "schema": SCHEMA,
        "type": "cuda" if cuda else "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(dist)
            for name, dist in (
                ("torch", "torch"),
                ("triton", "triton"),
                ("transformers", "transformers"),
                ("liger_kernel", "liger-kernel"),
                ("pytest_benchmark", "pytest-benchmark"),
            )
        },
        **commit_info(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_GB=props.total_memory / 1e9,
            multiprocessors=props.multi_processor_count,
            driver=_nvidia_driver(),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info.update(name=_cpu_name(), capability=None, cpu_threads=torch.get_num_threads(), driver=None)
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


def device_info(measure: bool = True) -> dict:
    """Device name, capability, driver, versions, commit and (with `measure`) the measured ceilings, as a JSON dict."""
    info = dict(_static_info())
    if measure:
        info.update(device_peaks())
    return info


def device_slug(name: str | None = None) -> str:
    """A file-name-safe device name: 'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3'."""
    name = name or _static_info()["name"]
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    return "-".join(part for part in slug.split("-") if part) or "device"

"""Shared benchmark helpers: providers, the `Case` a `setup_<op>` factory returns, and `bench`.

Every `benchmarks/test_bench_<op>.py` builds one `Case` per (provider, shape, dtype) with its `setup_<op>` factory
and times it in three modes with `bench`:

    forward   the loss (or op) with autograd recording; our losses also form the input gradient here
    backward  `.backward()` of a freshly built forward (the forward runs in the untimed setup)
    full      forward + backward

`extra_info` records `ms` (median), `GB_per_s` (the mode's minimum traffic, `Case.bytes[mode]`, over the median
time: the same numerator for every provider, so it reads as effective bandwidth) and, on CUDA, `peak_mem_MB`: the
`torch.cuda.max_memory_allocated` peak of one more run above what was allocated before it (inputs excluded).
Timed calls end in `torch.cuda.synchronize()`; warm-up rounds (which absorb `torch.compile`'s compilation) are
not timed. Under `--benchmark-disable` each mode runs once, with no warm-up: a smoke test.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# eager PyTorch, torch.compile of the same code, our kernels, Liger-Kernel when importable.
PROVIDERS = ["eager", "compile", "ours", "liger"]
MODES = ["forward", "backward", "full"]


@dataclass
class Case:
    """A ready-to-time op: `forward()` returns the output that `backward` mode calls `.backward(grad_output)` on."""

    forward: Callable[[], torch.Tensor]
    bytes: dict[str, int]  # minimum HBM traffic per mode
    inputs: list[torch.Tensor] = field(default_factory=list)  # tensors whose .grad is reset between rounds
    grad_output: torch.Tensor | None = None  # upstream gradient for non-scalar outputs


def check_provider(provider: str, liger_module: str | None = None):
    """Skip what cannot run here: torch.compile on CPU (minutes of compilation in CI), Liger without CUDA.

    Returns the imported Liger module for provider "liger".
    """
    if provider == "compile" and not CUDA:
        pytest.skip("torch.compile is measured on CUDA only (compiling on CPU is too slow for CI)")
    if provider == "liger":
        if liger_module is None:
            pytest.skip("Liger-Kernel has no counterpart of this op")
        module = pytest.importorskip(liger_module)
        if not CUDA:
            pytest.skip("Liger-Kernel needs CUDA")
        return module
    return None


def build(factory: Callable[..., Case], *args) -> Case:
    """`factory(*args)`, skipping the test when the inputs alone do not fit on the device."""
    try:
        return factory(*args)
    except torch.cuda.OutOfMemoryError:
        pytest.skip("inputs do not fit in device memory")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _zero_grads(case: Case):
    for x in case.inputs:
        x.grad = None


def bench(benchmark, case: Case, mode: str, rounds: int | None = None) -> None:
    """Time `case` in `mode` with pytest-benchmark and record ms, GB/s and peak memory in `extra_info`."""
    if mode == "forward":

        def setup():
            _zero_grads(case)
            _sync()

        def target():
            case.forward()
            _sync()

    elif mode == "backward":
        state = {}

        def setup():
            _zero_grads(case)
            state["loss"] = case.forward()
            _sync()

        def target():
            state.pop("loss").backward(case.grad_output)
            _sync()

    elif mode == "full":

        def setup():
            _zero_grads(case)
            _sync()

        def target():
            case.forward().backward(case.grad_output)
            _sync()

    else:
        raise ValueError(f"unknown mode {mode!r}")

    def run_once():
        setup()
        target()

    try:
        benchmark.pedantic(  # under --benchmark-disable: one setup + target, no warm-up, no stats
            target,
            setup=setup,
            rounds=rounds or (20 if CUDA else 3),
            iterations=1,
            warmup_rounds=3 if CUDA else 1,
        )
        if benchmark.disabled:
            return
        median = benchmark.stats.stats.median
        benchmark.extra_info["ms"] = median * 1e3
        benchmark.extra_info["GB_per_s"] = case.bytes[mode] / median / 1e9
        if CUDA:
            _zero_grads(case)
            _sync()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run_once()
            benchmark.extra_info["peak_mem_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"out of memory ({mode})")
    finally:
        _zero_grads(case)

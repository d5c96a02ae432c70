"""Softmax with temperature (kernels/softmax.py): time, GB/s and peak memory per provider.

Providers: `eager` (torch.softmax(x / T)), `compile` (CUDA only), `ours` (`softmax`); Liger-Kernel has no
temperature softmax to compare with. GB/s counts the minimum traffic: read x and write y (forward), read y and dy
and write dx (backward).

    pytest benchmarks/test_bench_softmax.py --benchmark-disable   # smoke run (CPU: tiny shapes, interpreter)
"""

import pytest
import torch

from benchmarks.common import DEVICE, MODES, PROVIDERS, Case, bench, build, check_provider
from benchmarks.shapes import DTYPES, SOFTMAX_SHAPES, TEMPERATURE, dtype_id, shape_id
from kernels import softmax


def _eager(x):
    return torch.softmax(x / TEMPERATURE, dim=-1)


def setup_softmax(provider: str, shape: tuple[int, int], dtype: torch.dtype) -> Case:
    """x (N, V) requiring grad; the backward takes a random upstream gradient."""
    check_provider(provider)
    n, v = shape
    x = (torch.randn(n, v, device=DEVICE) * 3).to(dtype).requires_grad_()
    dy = torch.randn(n, v, device=DEVICE).to(dtype)
    size = n * v * dtype.itemsize
    traffic = {"forward": 2 * size, "backward": 3 * size, "full": 5 * size}
    if provider in ("eager", "compile"):
        fn = _eager if provider == "eager" else torch.compile(_eager)
        forward = lambda: fn(x)
    else:
        forward = lambda: softmax(x, TEMPERATURE)
    return Case(forward, traffic, inputs=[x], grad_output=dy)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_softmax(benchmark, provider, shape, dtype, mode):
    benchmark.group = f"softmax-{mode}-{shape_id(shape)}-{dtype_id(dtype)}"
    bench(benchmark, build(setup_softmax, provider, shape, dtype), mode)

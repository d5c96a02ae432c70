"""Cosine loss on hidden states (kernels/cosine.py): time, GB/s and peak memory per provider.

Providers: `eager` (DistilBERT's CosineEmbeddingLoss with target 1), `compile` (CUDA only), `ours`
(`cosine_loss`: forward and gradient in one pass); Liger-Kernel's cosine loss works on logits, not hidden states,
so it has no counterpart. GB/s counts the minimum traffic: read s and t (forward), write the gradient (backward).

    pytest benchmarks/test_bench_cosine.py --benchmark-disable   # smoke run (CPU: tiny shapes, interpreter)
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import DEVICE, MODES, PROVIDERS, Case, bench, build, check_provider
from benchmarks.shapes import COSINE_SHAPES, DTYPES, dtype_id, shape_id
from kernels import cosine_loss


def _eager(s, t, target):
    return F.cosine_embedding_loss(s, t, target)


def setup_cosine(provider: str, shape: tuple[int, int], dtype: torch.dtype) -> Case:
    """Student hidden states (N, H) requiring grad, teacher hidden states constant, every row selected."""
    check_provider(provider)
    n, h = shape
    t = torch.randn(n, h, device=DEVICE).to(dtype)
    s = (t + torch.randn(n, h, device=DEVICE).to(dtype)).requires_grad_()
    target = torch.ones(n, device=DEVICE, dtype=dtype)
    size = n * h * dtype.itemsize
    traffic = {"forward": 2 * size, "backward": size, "full": 3 * size}
    if provider in ("eager", "compile"):
        fn = _eager if provider == "eager" else torch.compile(_eager)
        forward = lambda: fn(s, t, target)
    else:
        forward = lambda: cosine_loss(s, t)
    return Case(forward, traffic, inputs=[s])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", COSINE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cosine(benchmark, provider, shape, dtype, mode):
    benchmark.group = f"cosine-{mode}-{shape_id(shape)}-{dtype_id(dtype)}"
    bench(benchmark, build(setup_cosine, provider, shape, dtype), mode)

"""Single-pass KD + CE on given logits (kernels/distill.py): time, GB/s and peak memory per provider.

Providers: `eager` (the DistilBERT code's F.kl_div(batchmean)·T² + F.cross_entropy, in fp32 as autocast runs
softmax and cross-entropy), `compile` (the same under torch.compile, CUDA only), `ours` (`distill_loss`: one pass
forms the loss and the gradient) and `liger` (Liger-Kernel's cross-entropy and KL-divergence chained; its KL takes
log-probabilities, so the temperature softmaxes stay in PyTorch). GB/s counts the minimum traffic: read s and t
(forward), write the gradient (backward); the DESIGN floor is the `full` figure.

    pytest benchmarks/test_bench_distill.py --benchmark-disable   # smoke run (CPU: tiny shapes, interpreter)
    pytest benchmarks/test_bench_distill.py      # CUDA: N ∈ {4K, 16K, 64K}, V ∈ {30522, 50265, 128256}
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import DEVICE, MODES, PROVIDERS, Case, bench, build, check_provider
from benchmarks.shapes import (
    CE_WEIGHT,
    DISTILL_SHAPES,
    DTYPES,
    KD_WEIGHT,
    MLM_FRACTION,
    TEMPERATURE,
    dtype_id,
    shape_id,
)
from kernels import distill_loss


def _eager(s, t, y):
    s, t = s.float(), t.float()
    kd = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.softmax(t / TEMPERATURE, -1), reduction="batchmean")
    return KD_WEIGHT * kd * TEMPERATURE**2 + CE_WEIGHT * F.cross_entropy(s, y, ignore_index=-100)


def setup_distill(provider: str, shape: tuple[int, int], dtype: torch.dtype) -> Case:
    """KD on every row + CE on 15% of rows, student logits (N, V) requiring grad, teacher logits constant."""
    liger = check_provider(provider, "liger_kernel.transformers")
    n, v = shape
    s = (torch.randn(n, v, device=DEVICE) * 3).to(dtype).requires_grad_()
    t = (torch.randn(n, v, device=DEVICE) * 3).to(dtype)
    y = torch.randint(0, v, (n,), device=DEVICE)
    y[torch.rand(n, device=DEVICE) > MLM_FRACTION] = -100
    logits = n * v * dtype.itemsize
    traffic = {"forward": 2 * logits, "backward": logits, "full": 3 * logits}
    if provider in ("eager", "compile"):
        fn = _eager if provider == "eager" else torch.compile(_eager)
        forward = lambda: fn(s, t, y)
    elif provider == "ours":
        forward = lambda: distill_loss(s, t, y, None, TEMPERATURE, KD_WEIGHT, CE_WEIGHT).loss
    else:
        kl, ce = liger.LigerKLDIVLoss(reduction="batchmean"), liger.LigerCrossEntropyLoss(ignore_index=-100)
        forward = lambda: (
            KD_WEIGHT * kl(F.log_softmax(s / TEMPERATURE, -1), F.softmax(t / TEMPERATURE, -1)) * TEMPERATURE**2
            + CE_WEIGHT * ce(s, y)
        )
    return Case(forward, traffic, inputs=[s])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", DISTILL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_distill(benchmark, provider, shape, dtype, mode):
    benchmark.group = f"distill-{mode}-{shape_id(shape)}-{dtype_id(dtype)}"
    bench(benchmark, build(setup_distill, provider, shape, dtype), mode)

"""LM-head-fused distillation (kernels/fused_linear.py): KD + CE through both vocab projections, time and memory.

Providers: `eager` (projection → [N, V] logits → the DistilBERT code's F.kl_div(batchmean)·T² + F.cross_entropy in
fp32 → autograd), `compile` (the same under torch.compile, CUDA only), `ours` (`fused_linear_distill_loss`: chunked,
forms the loss and the three gradients in its forward) and `liger` (Liger-Kernel's chunked fused-linear JSD loss
with β = 0, i.e. a KL, plus its hard-label CE; it applies no T²). Besides `benchmarks.common.bench`'s ms, GB/s and
peak memory, `extra_info` holds `TFLOP_per_s` (the mode's matmul FLOPs over the median time: the figure for this
compute-bound op) and `logits_MB` (one [N, V] logits tensor, the yardstick for `peak_mem_MB`).

    pytest benchmarks/test_bench_fused_linear.py --benchmark-disable   # smoke run (CPU: tiny shapes, interpreter)
    pytest benchmarks/test_bench_fused_linear.py      # CUDA: H = 768, V = 30522, N ∈ {4K, 16K, 64K}
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import DEVICE, MODES, PROVIDERS, Case, bench, build, check_provider
from benchmarks.shapes import CE_WEIGHT, DTYPES, HIDDEN, KD_WEIGHT, MLM_FRACTION, ROWS, TEMPERATURE, VOCABS, dtype_id
from kernels import fused_linear_distill_loss

# (N, H, V): BERT-base's hidden size and vocabulary (teacher and student both H wide), every row count.
FUSED_LINEAR_SHAPES = [(n, HIDDEN[0], VOCABS[0]) for n in ROWS]


def _eager(h_s, w_s, b_s, h_t, w_t, b_t, y):
    s, t = F.linear(h_s, w_s, b_s).float(), F.linear(h_t, w_t, b_t).float()
    kd = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.softmax(t / TEMPERATURE, -1), reduction="batchmean")
    return KD_WEIGHT * kd * TEMPERATURE**2 + CE_WEIGHT * F.cross_entropy(s, y, ignore_index=-100)


def setup_fused_linear(provider: str, shape: tuple[int, int, int], dtype: torch.dtype) -> Case:
    """KD on every row + CE on 15% of rows; student rows, weight and bias require grad, the teacher's do not."""
    liger = check_provider(provider, "liger_kernel.chunked_loss")
    n, h, v = shape
    student = [
        torch.randn(n, h, device=DEVICE).to(dtype).requires_grad_(),
        (torch.randn(v, h, device=DEVICE) / h**0.5).to(dtype).requires_grad_(),
        torch.zeros(v, device=DEVICE, dtype=dtype, requires_grad=True),
    ]
    teacher = [
        torch.randn(n, h, device=DEVICE).to(dtype),
        (torch.randn(v, h, device=DEVICE) / h**0.5).to(dtype),
        torch.zeros(v, device=DEVICE, dtype=dtype),
    ]
    y = torch.randint(0, v, (n,), device=DEVICE)
    y[torch.rand(n, device=DEVICE) > MLM_FRACTION] = -100
    args = (*student, *teacher, y)
    # Minimum traffic: read rows and weights (forward), write the student gradients (backward).
    size = dtype.itemsize
    reads, writes = (2 * n * h + 2 * v * h + 2 * v) * size, (n * h + v * h + v) * size
    traffic = {"forward": reads, "backward": writes, "full": reads + writes}
    if provider in ("eager", "compile"):
        fn = _eager if provider == "eager" else torch.compile(_eager)
        forward = lambda: fn(*args)
    elif provider == "ours":
        forward = lambda: fused_linear_distill_loss(*args, None, TEMPERATURE, KD_WEIGHT, CE_WEIGHT).loss
    else:
        loss = liger.LigerFusedLinearJSDLoss(weight_hard_loss=CE_WEIGHT, weight_soft_loss=KD_WEIGHT, beta=0.0,
                                             temperature=TEMPERATURE)  # fmt: skip
        h_s, w_s, b_s, h_t, w_t, b_t = args[:6]
        forward = lambda: loss(h_s, w_s, h_t, w_t, y, b_s, b_t)
    return Case(forward, traffic, inputs=student)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", FUSED_LINEAR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fused_linear(benchmark, provider, shape, dtype, mode):
    n, h, v = shape
    benchmark.group = f"fused_linear-{mode}-{n}x{h}x{v}-{dtype_id(dtype)}"
    bench(benchmark, build(setup_fused_linear, provider, shape, dtype), mode)
    # Matmul FLOPs: both projections (forward); G·W_s and Gᵀ·h_s (backward; ours does them in its forward).
    flops = {"forward": 4 * n * h * v, "backward": 4 * n * h * v, "full": 8 * n * h * v}[mode]
    if "ms" in benchmark.extra_info:
        benchmark.extra_info["TFLOP_per_s"] = flops / benchmark.extra_info["ms"] / 1e9
    benchmark.extra_info["logits_MB"] = n * v * dtype.itemsize / 2**20

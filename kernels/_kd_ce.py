"""What the two KD+CE families share: the dense teacher (`kernels.distill`) and the stored top-K teacher
(`kernels.sparse_kd`) differ in their KD statistics only; the rest of a row, and of a launch, is this module.

In the kernels (`@triton.jit` helpers, inlined): the rows of a program and their selections (`row_setup`), the
row maximum as a shift (`shift`), the CE row (`ce_row`: CE = (M − s_y) + log Σ exp(s − M) − ε Σ_v (s_v − s_y)/V,
the `kernels.distill` docstring's form) and its gradient (`ce_grad`: softmax(s) − (1−ε)·onehot(y) − ε/V), and the
row stores (`store_rows`).

On the host: the launchers' buffers and stand-ins (`launch_buffers`), the row-level functions' argument checks
(`check_row_args`), and the autograd Functions' weights → per-row scales (`loss_scales`), sums (`weighted_means`)
and backward (`stored_grad_backward`); the public functions' flattening (`flat_rows`) and output (`DistillLossOutput`),
their checks of the row selections (`check_label_rows`) and their Modules' constructor (`WeightedLossModule`).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import _contract as check
from kernels._grad import grad_scale_for, scale_grad_

# ---- in the kernels --------------------------------------------------------------------------------------------------


@triton.jit
def shift(m):
    """The row maximum as a shift: 0 while a row has seen only −inf (x − (−inf) would turn −inf entries into NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def row_setup(
    s_ptr, y_ptr, kd_mask_ptr, N, V, stride_s, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_KD_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The program's rows and what each takes: (out_rows, row_ok, rows, kd_on, ce_on, in_range, y, s_y).

    BLOCK_N rows per program, 64-bit (row·stride passes 2^31 elements). Rows past N re-read row N−1 (same program,
    so in-place stays safe) and are never stored: loads need no row mask and the padding never computes log 0.
    Labels are compared in 64 bits (no label wraps into range); the label logit s_y is read here, before a gradient
    written in place may overwrite it, and never at an out-of-range index (in_range False: the row turns NaN later).
    """
    out_rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = out_rows < N
    rows = tl.minimum(out_rows, N - 1)
    kd_on = row_ok
    if HAS_KD_MASK:
        kd_on = tl.load(kd_mask_ptr + rows) != 0
    ce_on = row_ok
    in_range = row_ok
    y = tl.zeros([BLOCK_N], dtype=tl.int32)
    s_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_LABELS:
        y_raw = tl.load(y_ptr + rows).to(tl.int64)
        ce_on = y_raw != ignore_index
        in_range = (y_raw >= 0) & (y_raw < V)
        y = tl.where(in_range, y_raw, 0).to(tl.int32)
        s_y = tl.load(s_ptr + rows * stride_s + y, mask=ce_on & in_range, other=0.0).to(tl.float32)
    return out_rows, row_ok, rows, kd_on, ce_on, in_range, y, s_y


@triton.jit
def ce_row(sh_s, s_y, log_d1, s_sum, smoothing, V, ce_on, in_range, HAS_LABELS: tl.constexpr,
            HAS_SMOOTHING: tl.constexpr):  # fmt: skip
    """CE = (M_s − s_y) + log d_1 − ε·Σ_v (s_v − s_y)/V per row (0 without labels or where ignored; NaN for a label
    outside [0, V): no out-of-bounds read, no host sync)."""
    ce = tl.zeros(sh_s.shape, dtype=tl.float32)
    if HAS_LABELS:
        ce = (sh_s - s_y) + log_d1
        if HAS_SMOOTHING:
            ce -= smoothing * (s_sum / V)
        ce = tl.where(in_range, ce, float("nan"))
        ce = tl.where(ce_on, ce, 0.0)
    return ce


@triton.jit
def ce_grad(x, cols, y, ce_on, in_range, ce_coef, log_d1, smoothing, V):
    """ce_coef·(softmax(s) − (1−ε)·onehot(y) − ε/V) in fp32 at columns `cols` (broadcast to x), x = s − M_s."""
    # (q − 1) at the true class is formed in fp32; rounding q first to bf16 cancels catastrophically near q = 1.
    onehot = tl.where(cols == y[:, None], 1.0 - smoothing, 0.0)
    g = tl.exp(x - log_d1[:, None]) - smoothing / V - onehot
    g = tl.where(in_range[:, None], g, float("nan"))  # a label outside [0, V) poisons its row
    return tl.where(ce_on[:, None], ce_coef * g, 0.0)  # where, not a 0 factor: ignored rows may hold NaN


@triton.jit
def store_rows(kd_row_ptr, ce_row_ptr, out_rows, row_ok, kd, ce):
    """Every row is written, ignored ones with 0."""
    tl.store(kd_row_ptr + out_rows, kd, mask=row_ok)
    tl.store(ce_row_ptr + out_rows, ce, mask=row_ok)


# ---- the launchers and the row-level functions -----------------------------------------------------------------------


def scale_tensor(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A () fp32 device tensor for a loss weight; a tensor stays where it is (no host round trip)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(x), dtype=torch.float32, device=device)


def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """x with a unit column stride (the kernels' vector loads); rows may stay strided. A copy only if transposed."""
    return x if x.stride(-1) == 1 else x.contiguous()


def launch_buffers(student, labels, kd_mask, kd_scale, ce_scale, compute_grad, grad_out) -> tuple:
    """(kd_row, ce_row, grad or None, labels, mask as uint8, kd_scale, ce_scale) for a launch on (N, V) `student`:
    the fp32 row outputs, the gradient buffer (`grad_out` or a fresh contiguous one), and the student standing in for
    absent optional inputs (the kernel never reads them: a constexpr switch is off)."""
    n, device = student.shape[0], student.device
    kd_row = torch.empty(n, dtype=torch.float32, device=device)
    ce_row = torch.empty(n, dtype=torch.float32, device=device)
    grad = None
    if compute_grad:
        grad = torch.empty_like(student, memory_format=torch.contiguous_format) if grad_out is None else grad_out
    y = student if labels is None else labels.contiguous()
    m = student if kd_mask is None else kd_mask.contiguous().to(torch.bool).view(torch.uint8)
    return kd_row, ce_row, grad, y, m, scale_tensor(kd_scale, device), scale_tensor(ce_scale, device)


def check_row_args(student, labels, kd_mask, temperature, kd_scale, ce_scale, label_smoothing, ignore_index,
                   grad_out) -> tuple:  # fmt: skip
    """The row-level functions' checks beyond the teacher (`kd_ce_rows`, `sparse_kd_ce_rows`); returns
    (temperature, kd_scale, ce_scale, label_smoothing, ignore_index) as their checked values."""
    check.per_row("labels", labels, student, "int")
    check.per_row("kd_mask", kd_mask, student, "bool")
    temperature = check.temperature(temperature)
    kd_scale, ce_scale = check.weight("kd_scale", kd_scale), check.weight("ce_scale", ce_scale)
    label_smoothing = check.real("label_smoothing", label_smoothing, 0.0, 1.0)
    ignore_index = check.integer("ignore_index", ignore_index)
    if grad_out is not None:
        check.tensor("grad_out", grad_out, shape=student.shape, device=student.device)
        if grad_out.dtype != student.dtype or grad_out.stride(1) != 1:
            raise ValueError(f"grad_out must have the student's dtype {student.dtype} and a unit column stride")
    return temperature, kd_scale, ce_scale, label_smoothing, ignore_index


# ---- the autograd Functions ------------------------------------------------------------------------------------------


def row_count(selected: torch.Tensor | None, n: int) -> torch.Tensor | float:
    """Number of rows a mean divides by, at least 1 (an empty selection averages to 0); a device tensor, no sync."""
    return float(max(n, 1)) if selected is None else selected.sum().clamp_min(1).to(torch.float32)


def abs_scale(x: float | torch.Tensor) -> float | torch.Tensor:
    """|x| for a loss weight given as a number or a () device tensor (which stays on the device)."""
    return x.abs() if isinstance(x, torch.Tensor) else abs(x)


def loss_scales(student, labels, kd_mask, has_teacher, temperature, kd_weight, ce_weight, ignore_index) -> tuple:
    """(n_kd, n_ce, kd_scale, ce_scale, K) of kd_weight·mean KD + ce_weight·mean CE: the row counts, each row term's
    weight (weight / count) and the fp16 factor K of the stored gradient (`kernels._grad`), from the bound
    |∂kd_row/∂s| ≤ T, |∂ce_row/∂s| ≤ 1 (each a difference of two numbers in [0, 1], times T for the KD term)."""
    n_kd = row_count(kd_mask, student.shape[0]) if has_teacher else 1.0
    n_ce = row_count(labels != ignore_index, 0) if labels is not None else 1.0
    kd_scale = kd_weight / n_kd if has_teacher else 0.0
    ce_scale = ce_weight / n_ce if labels is not None else 0.0
    k = grad_scale_for(student.dtype, abs_scale(kd_scale) * temperature + abs_scale(ce_scale))
    return n_kd, n_ce, kd_scale, ce_scale, k


def weighted_means(ctx, kd_row, ce_row, grad, n_kd, n_ce, k, kd_weight, ce_weight) -> tuple:
    """(loss, kd, ce) from the rows; saves the stored gradient and K for `stored_grad_backward`. kd and ce are for
    logging: the stored gradient is that of `loss` only."""
    kd, ce = kd_row.sum() / n_kd, ce_row.sum() / n_ce
    ctx.save_for_backward(grad)
    ctx.grad_scale = k
    ctx.mark_non_differentiable(kd, ce)
    return kd_weight * kd + ce_weight * ce, kd, ce


def stored_grad_backward(ctx, grad_loss, n_inputs: int) -> tuple:
    """The stored gradient scaled in place by grad_loss / K (so no second (N, V) buffer, and no pass at all when
    grad_loss is 1 and K is 1), then None for the other n_inputs − 1 inputs."""
    (grad,) = ctx.saved_tensors
    return (scale_grad_(grad, grad_loss, ctx.grad_scale),) + (None,) * (n_inputs - 1)


# ---- the public functions and Modules --------------------------------------------------------------------------------


class DistillLossOutput(NamedTuple):
    """() fp32 tensors: `loss` = kd_weight·kd + ce_weight·ce carries the gradient; `kd` and `ce` are for logging."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def flat_rows(logits: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., V) → (N, V) and (...) → (N,); a view unless reshape must copy."""
    return logits.reshape(-1, logits.shape[-1]), None if rows is None else rows.reshape(-1)


def check_label_rows(student_logits, labels, kd_mask, temperature, ignore_index) -> tuple[float, int]:
    """The public losses' checks of the rows' selections beside checked (..., V) `student_logits`; returns
    (temperature, ignore_index) as a float and an int."""
    check.per_row("labels", labels, student_logits, "int")
    check.per_row("kd_mask", kd_mask, student_logits, "bool")
    return check.temperature(temperature), check.integer("ignore_index", ignore_index)


class WeightedLossModule(torch.nn.Module):
    """A loss Module's checked settings: temperature, kd_weight, ce_weight, ignore_index (`DistillLoss`,
    `SparseDistillLoss`)."""

    def __init__(self, temperature: float = 2.0, kd_weight: float = 1.0, ce_weight: float = 1.0, ignore_index=-100):
        super().__init__()
        self.temperature = check.temperature(temperature)
        self.kd_weight, self.ce_weight = check.weight("kd_weight", kd_weight), check.weight("ce_weight", ce_weight)
        self.ignore_index = check.integer("ignore_index", ignore_index)

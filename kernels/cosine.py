"""Cosine embedding loss between student and teacher hidden states, forward and backward fused.

Per row n of width H with student s, teacher t (a constant) and eps = 1e-8, as torch's `cosine_similarity`:

    n_s = max(‖s‖, eps),  n_t = max(‖t‖, eps),  cos = s·t / (n_s n_t)
    loss = Σ_{n selected} (1 − cos_n) / max(#selected, 1)          (CosineEmbeddingLoss with target 1)

Gradient with respect to s, from ∂‖s‖/∂s = s/‖s‖:

    ∂(1 − cos)/∂s = −t / (n_s n_t) + cos · s / n_s²

(the second term only where ‖s‖ > eps; below it the clamped norm is a constant). One program per block of rows:
pass 1 reduces s·t, ‖s‖², ‖t‖² in fp32, pass 2 writes the gradient scaled by 1/#selected. A row that fits one
block (H ≤ 4096 at 2 bytes, e.g. BERT's 768) stays in registers: one read of s and t, one write of the gradient.
The loss returns the gradient from forward and multiplies it by the upstream gradient in backward.

NaN. The clamp is written max(‖s‖, eps) but must not be a maxnum: on a GPU max(NaN, eps) is eps, which turned a
NaN row into finite gradients of size 1/eps. Here a NaN or inf anywhere in a selected row gives a NaN loss and a
NaN gradient row, as torch does.

fp16 under loss scaling. The gradient is formed before the loss scale S of fp16 training exists; an fp16 student's
gradient is therefore stored in fp32 ((N, H), hidden-state sized, not vocabulary sized) and rounded to fp16 once,
after the multiplication by the upstream gradient: the same single rounding of S·g as torch's. bf16 and fp32
students store it in their own dtype, scaled in place.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels import _contract as check
from kernels._dispatch import use_triton
from kernels._tiles import round_to, row_tiles
from kernels.reference import cosine_rows_reference

EPS = 1e-8  # torch.nn.functional.cosine_similarity's default


@triton.jit
def _cosine_fwd_kernel(
    s_ptr,  # (N, H) student hidden states, fp32/bf16/fp16, unit column stride
    t_ptr,  # (N, H) teacher hidden states, fp32/bf16/fp16, unit column stride
    mask_ptr,  # (N,) uint8 selected rows (unused without HAS_MASK)
    scale_ptr,  # () fp32 gradient scale, 1/#selected
    loss_row_ptr,  # (N,) fp32 out: 1 − cos, 0 for unselected rows
    g_ptr,  # (N, H) out, fp32 for fp16 students, else the student dtype (unused without COMPUTE_GRAD)
    N,
    H,
    stride_s,
    stride_t,
    stride_g,
    eps,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # 64-bit row offsets
    row_ok = out_rows < N
    rows = tl.minimum(out_rows, N - 1)  # padding rows re-read row N−1 and are never stored
    cols = tl.arange(0, BLOCK)
    s_rows = s_ptr + rows[:, None] * stride_s
    t_rows = t_ptr + rows[:, None] * stride_t
    on = row_ok
    if HAS_MASK:
        on = tl.load(mask_ptr + rows) != 0

    # Pass 1: s·t, ‖s‖², ‖t‖² in fp32.
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    ss = tl.zeros([BLOCK_N], dtype=tl.float32)
    tt = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SINGLE_TILE:
        mask = (cols < H)[None, :]
        s = tl.load(s_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dot, ss, tt = tl.sum(s * t, axis=1), tl.sum(s * s, axis=1), tl.sum(t * t, axis=1)
    else:
        for start in range(0, H, BLOCK):
            mask = (start + cols < H)[None, :]
            sb = tl.load(s_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tb = tl.load(t_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(sb * tb, axis=1)
            ss += tl.sum(sb * sb, axis=1)
            tt += tl.sum(tb * tb, axis=1)
    norm_s = tl.sqrt(ss)
    norm_t = tl.sqrt(tt)
    # max(‖·‖, eps) written so that NaN stays NaN (tl.maximum is a maxnum on GPUs: max(NaN, eps) = eps).
    n_s = tl.where(norm_s < eps, eps, norm_s)
    n_t = tl.where(norm_t < eps, eps, norm_t)
    cos = dot / (n_s * n_t)
    tl.store(loss_row_ptr + out_rows, tl.where(on, 1.0 - cos, 0.0), mask=row_ok)

    # Pass 2: grad = scale·(−t/(n_s n_t) + cos·s/n_s²), 0 for unselected rows.
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr)
        c_t = tl.where(on, -scale / (n_s * n_t), 0.0)[:, None]
        c_s = tl.where(on & (norm_s < eps), 0.0, scale * cos / (n_s * n_s))  # below eps the clamp is constant
        c_s = tl.where(on, c_s, 0.0)[:, None]
        g_rows = g_ptr + out_rows[:, None] * stride_g
        if SINGLE_TILE:
            g = tl.where(on[:, None], c_t * t + c_s * s, 0.0)  # where, not a 0 factor: unselected rows may be NaN
            tl.store(g_rows + cols[None, :], round_to(g, g_ptr.dtype.element_ty), mask=row_ok[:, None] & mask)
        else:
            for start in range(0, H, BLOCK):
                mask = (start + cols < H)[None, :]
                sb = tl.load(s_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                tb = tl.load(t_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                g = tl.where(on[:, None], c_t * tb + c_s * sb, 0.0)
                tl.store(
                    g_rows + start + cols[None, :], round_to(g, g_ptr.dtype.element_ty), mask=row_ok[:, None] & mask
                )


def grad_dtype(student: torch.Tensor) -> torch.dtype:
    """The dtype the gradient is stored in until the backward: fp32 for fp16 students (see the module docstring)."""
    return torch.float32 if student.dtype == torch.float16 else student.dtype


def cosine_fwd(student, teacher, mask, scale, compute_grad):
    """Launch `_cosine_fwd_kernel`: (loss_row (N,) fp32, grad (N, H) in `grad_dtype(student)` or None)."""
    if student.stride(1) != 1:  # vector loads need unit column strides; rows may be strided
        student = student.contiguous()
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    n, h = student.shape
    loss_row = torch.empty(n, dtype=torch.float32, device=student.device)
    grad = torch.empty((n, h), dtype=grad_dtype(student), device=student.device) if compute_grad else None
    if n > 0:
        block_n, block, num_warps = row_tiles(h, student.dtype)
        if not isinstance(scale, torch.Tensor):  # torch.full fills on the device; as_tensor would copy from host
            scale = torch.full((), scale, dtype=torch.float32, device=student.device)
        _cosine_fwd_kernel[(triton.cdiv(n, block_n),)](
            student, teacher, student if mask is None else mask.contiguous().to(torch.bool).view(torch.uint8), scale,
            loss_row, student if grad is None else grad, n, h, student.stride(0), teacher.stride(0),
            0 if grad is None else grad.stride(0), EPS,
            HAS_MASK=mask is not None, COMPUTE_GRAD=compute_grad, SINGLE_TILE=h <= block, BLOCK_N=block_n,
            BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return loss_row, grad


def cosine_rows(student, teacher, mask, scale, compute_grad):
    """Per-row 1 − cos and its gradient times `scale`: the kernel where `use_triton` says so, else the reference."""
    if use_triton(student, teacher, mask):
        return cosine_fwd(student, teacher, mask, scale, compute_grad)
    loss_row, grad = cosine_rows_reference(student, teacher, mask, scale, EPS, compute_grad, grad_dtype(student))
    return loss_row, grad


class CosineLossFunction(torch.autograd.Function):
    """Mean over selected rows of 1 − cos(s, t); the gradient to s is made in forward and scaled in backward."""

    @staticmethod
    def forward(ctx, student, teacher, mask):
        count = float(max(student.shape[0], 1)) if mask is None else mask.sum().clamp_min(1).to(torch.float32)
        loss_row, grad = cosine_rows(student, teacher, mask, 1.0 / count, ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        ctx.dtype = student.dtype
        return loss_row.sum() / count  # a device count clamped to ≥ 1: no sync, no rows → 0

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        # In place: no second (N, H) buffer; a second backward fails autograd's saved-tensor version check. An fp16
        # student's fp32 gradient is rounded here, once, after the loss scale.
        return grad.mul_(grad_loss).to(ctx.dtype), None, None


def cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over selected rows of 1 − cos(s, t), as CosineEmbeddingLoss with target 1 (DistilBERT's L_cos).

    Args:
        student_hidden: (..., H) fp32/bf16/fp16 (fp64 runs the reference), H ≥ 1; receives the gradient.
        teacher_hidden: (..., H) float, the student's shape and device; a constant: it must not require grad.
        mask: (...) bool rows that count, student_hidden.shape[:-1]; None: all rows.

    Returns:
        () fp32; 0 (and a 0 gradient) when no row is selected; NaN when a selected row holds NaN or inf. eps = 1e-8
        clamps each norm, like `torch.nn.functional.cosine_similarity`.

    Raises:
        ValueError naming the argument, for inputs outside this contract (checked on the host, no device sync).
    """
    check.logits("student_hidden", student_hidden)
    check.like("teacher_hidden", teacher_hidden, student_hidden)
    check.constant("teacher_hidden", teacher_hidden)
    check.per_row("mask", mask, student_hidden, "bool")
    h = student_hidden.shape[-1]
    s, t = student_hidden.reshape(-1, h), teacher_hidden.reshape(-1, h)
    mask = None if mask is None else mask.reshape(-1)
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        return _library.cosine_loss(s, t, mask)
    return CosineLossFunction.apply(s, t, mask)


class CosineLoss(torch.nn.Module):
    """Module form of `cosine_loss`."""

    def forward(self, student_hidden, teacher_hidden, mask=None) -> torch.Tensor:
        return cosine_loss(student_hidden, teacher_hidden, mask)

"""Softmax and log-softmax over the last dimension, with a temperature.

Forward, per row x of width V, with z = x/T and lse(z) = log Σ_v exp(z_v):

    softmax:      y_v = exp(z_v − lse(z))
    log_softmax:  y_v = z_v − lse(z)

Backward, with upstream gradient dy and ∂z/∂x = 1/T:

    softmax:      dx = y ⊙ (dy − Σ_v dy_v y_v) / T        (Jacobian of softmax: diag(y) − y yᵀ)
    log_softmax:  dx = (dy − exp(y) Σ_v dy_v) / T          (Jacobian of log-softmax: I − 1 softmax(z)ᵀ)

Both directions are two passes over the row's V-blocks inside one program: pass 1 reduces (online max and sum
for the forward, Milakov & Gimelshein 2018; Σ dy·y or Σ dy for the backward), pass 2 writes. A row that fits one
block stays in registers between the passes. Reductions are fp32; outputs take the input dtype, like torch.
Entries of −inf give y = 0 (log: −inf); a row of only −inf, or with a NaN, gives NaN, as in torch.

Large logits. The forward works relative to the row maximum m of the raw x: z − lse(z) = (x − m)/T − log d with
d = Σ exp((x − m)/T). Forming lse = m/T + log d first and subtracting it from x/T would round at |m/T| (fp32 keeps
~2⁻²⁴|m|: 6e-4 absolute at 1e4, where torch is accurate to ~1e-7); dividing by T before subtracting m would round
at |x/T|. Here the only large subtraction is x − m, between entries of one row.
"""

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels import _contract as check
from kernels._dispatch import use_triton
from kernels._tiles import round_to, row_tiles
from kernels.reference import softmax_backward_reference, softmax_reference


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # (N, V) input, fp32/bf16/fp16, unit column stride
    y_ptr,  # (N, V) output, input dtype
    N,
    V,
    stride_x,
    stride_y,
    inv_t,
    LOG: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # 64-bit row offsets
    row_ok = out_rows < N
    rows = tl.minimum(out_rows, N - 1)  # padding rows re-read row N−1 and are never stored
    cols = tl.arange(0, BLOCK)
    x_rows = x_ptr + rows[:, None] * stride_x
    y_rows = y_ptr + out_rows[:, None] * stride_y

    # Pass 1: running maximum m of the raw x (for T > 0 that of x/T is m/T) and d = Σ exp((x − m)/T). While a row has
    # seen only −inf, shift by 0, not by −inf (−inf − (−inf) is NaN).
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    d = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SINGLE_TILE:
        x = tl.load(x_rows + cols[None, :], mask=(cols < V)[None, :], other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=1)
        z = (x - tl.where(m == float("-inf"), 0.0, m)[:, None]) * inv_t
        d = tl.sum(tl.exp(z), axis=1)
    else:
        for start in range(0, V, BLOCK):
            mask = (start + cols < V)[None, :]
            xb = tl.load(x_rows + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(xb, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            # From the raw old maximum: exp(−inf) = 0 empties a sum that has seen nothing.
            d = d * tl.exp((m - shift) * inv_t) + tl.sum(tl.exp((xb - shift[:, None]) * inv_t), axis=1)
            m = m_new
    shift = tl.where(m == float("-inf"), 0.0, m)
    log_d = tl.log(d)

    # Pass 2: y = (x − m)/T − log d (or its exp). Not x/T − (m/T + log d): that rounds at |m/T|, the size of the
    # logits, where every term here has the size of their spread.
    if SINGLE_TILE:
        y = z - log_d[:, None]
        if not LOG:
            y = tl.exp(y)
        tl.store(
            y_rows + cols[None, :], round_to(y, y_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :]
        )
    else:
        for start in range(0, V, BLOCK):
            mask = (start + cols < V)[None, :]
            xb = tl.load(x_rows + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
            y = (xb - shift[:, None]) * inv_t - log_d[:, None]
            if not LOG:
                y = tl.exp(y)
            tl.store(y_rows + start + cols[None, :], round_to(y, y_ptr.dtype.element_ty), mask=row_ok[:, None] & mask)


@triton.jit
def _softmax_bwd_kernel(
    y_ptr,  # (N, V) forward output, unit column stride
    dy_ptr,  # (N, V) upstream gradient, unit column stride
    dx_ptr,  # (N, V) input gradient out, input dtype
    N,
    V,
    stride_y,
    stride_dy,
    stride_dx,
    inv_t,
    LOG: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    out_rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = out_rows < N
    rows = tl.minimum(out_rows, N - 1)
    cols = tl.arange(0, BLOCK)
    y_rows = y_ptr + rows[:, None] * stride_y
    dy_rows = dy_ptr + rows[:, None] * stride_dy
    dx_rows = dx_ptr + out_rows[:, None] * stride_dx

    # Pass 1: c = Σ dy·y (softmax) or Σ dy (log-softmax). Masked entries load 0 and add nothing.
    c = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SINGLE_TILE:
        mask = (cols < V)[None, :]
        y = tl.load(y_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if LOG:
            c = tl.sum(dy, axis=1)
        else:
            c = tl.sum(dy * y, axis=1)
    else:
        for start in range(0, V, BLOCK):
            mask = (start + cols < V)[None, :]
            dyb = tl.load(dy_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if LOG:
                c += tl.sum(dyb, axis=1)
            else:
                yb = tl.load(y_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                c += tl.sum(dyb * yb, axis=1)

    # Pass 2: dx = y(dy − c)/T, or (dy − exp(y)·c)/T.
    if SINGLE_TILE:
        if LOG:
            dx = (dy - tl.exp(y) * c[:, None]) * inv_t
        else:
            dx = y * (dy - c[:, None]) * inv_t
        tl.store(dx_rows + cols[None, :], round_to(dx, dx_ptr.dtype.element_ty), mask=row_ok[:, None] & mask)
    else:
        for start in range(0, V, BLOCK):
            mask = (start + cols < V)[None, :]
            yb = tl.load(y_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dyb = tl.load(dy_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = (dyb - tl.exp(yb) * c[:, None]) * inv_t
            else:
                dx = yb * (dyb - c[:, None]) * inv_t
            tl.store(
                dx_rows + start + cols[None, :], round_to(dx, dx_ptr.dtype.element_ty), mask=row_ok[:, None] & mask
            )


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    """(..., V) → (N, V) with unit column stride: a view when possible, a copy for transposed or odd layouts."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 or x2.shape[1] == 1 else x2.contiguous()


def softmax_fwd(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Launch `_softmax_fwd_kernel` on (..., V) `x`; returns y of x's shape and dtype (contiguous)."""
    x2 = _unit_cols(x)
    n, v = x2.shape
    y = torch.empty((n, v), dtype=x.dtype, device=x.device)
    if n > 0:
        block_n, block, num_warps = row_tiles(v, x.dtype)
        _softmax_fwd_kernel[(triton.cdiv(n, block_n),)](
            x2, y, n, v, x2.stride(0), y.stride(0), 1.0 / temperature,
            LOG=log, SINGLE_TILE=v <= block, BLOCK_N=block_n, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return y.view(x.shape)


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Launch `_softmax_bwd_kernel`: dx (contiguous, y's shape and dtype) from the forward output y and dy."""
    y2, dy2 = _unit_cols(y), _unit_cols(dy)
    n, v = y2.shape
    dx = torch.empty((n, v), dtype=y.dtype, device=y.device)
    if n > 0:
        block_n, block, num_warps = row_tiles(v, y.dtype)
        _softmax_bwd_kernel[(triton.cdiv(n, block_n),)](
            y2, dy2, dx, n, v, y2.stride(0), dy2.stride(0), dx.stride(0), 1.0 / temperature,
            LOG=log, SINGLE_TILE=v <= block, BLOCK_N=block_n, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return dx.view(y.shape)


def softmax_rows(x: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """softmax(x/T) or log_softmax(x/T) over the last dim: the kernel where `use_triton` says so, else the reference."""
    if use_triton(x):
        return softmax_fwd(x, temperature, log)
    return softmax_reference(x, temperature, log)


def softmax_rows_backward(y: torch.Tensor, dy: torch.Tensor, temperature: float, log: bool) -> torch.Tensor:
    """Input gradient from the forward output y and the upstream gradient dy, dispatched like `softmax_rows`."""
    if use_triton(y, dy):
        return softmax_bwd(y, dy, temperature, log)
    return softmax_backward_reference(y, dy, temperature, log)


class SoftmaxFunction(torch.autograd.Function):
    """softmax(x/T) or log_softmax(x/T) over the last dim; saves the output, like torch."""

    @staticmethod
    def forward(ctx, x, temperature, log):
        y = softmax_rows(x, temperature, log)
        ctx.save_for_backward(y)
        ctx.temperature, ctx.log = temperature, log
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return softmax_rows_backward(y, dy, ctx.temperature, ctx.log), None, None


def softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(x / T) over the last dim.

    Args:
        x: (..., V) fp32/bf16/fp16 (fp64 runs the reference), at least 1-D; any strides.
        temperature: T > 0: a Python or NumPy number or a 0-dim CPU tensor.

    Returns:
        (..., V) in x's dtype, contiguous; reductions in fp32.

    Raises:
        ValueError naming the argument (an integer x, say), checked on the host.
    """
    x, temperature = _checked(x), check.temperature(temperature)
    if torch.compiler.is_compiling():  # one registered op for torch.compile (kernels._library); eager never comes here
        from kernels import _library

        return _library.softmax(x, temperature, False)
    return SoftmaxFunction.apply(x, temperature, False)


def log_softmax(x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(x / T) over the last dim; shapes, dtypes and errors as `softmax`."""
    x, temperature = _checked(x), check.temperature(temperature)
    if torch.compiler.is_compiling():  # as in `softmax`
        from kernels import _library

        return _library.softmax(x, temperature, True)
    return SoftmaxFunction.apply(x, temperature, True)


def _checked(x: torch.Tensor) -> torch.Tensor:
    check.tensor("x", x, "float")
    if x.dim() < 1:
        raise ValueError(f"x must be at least 1-dimensional (..., V), got a 0-dim {x.dtype} tensor")
    return x


class Softmax(torch.nn.Module):
    """Module form of `softmax` (last dim, temperature T)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check.temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax(x, self.temperature)


class LogSoftmax(Softmax):
    """Module form of `log_softmax` (last dim, temperature T)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_softmax(x, self.temperature)

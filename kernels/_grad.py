"""The backward shared by every loss that forms its gradient in the forward: stored gradient × upstream gradient.

A loss that writes ∂loss/∂x during its forward (the KD+CE and cosine kernels) has a backward that only applies the
chain rule, grad ← grad · dy with dy the upstream gradient (a () tensor, or (N,) per row for reduction='none'). It
runs in place, so no second (N, V) buffer exists, and it costs nothing when dy is exactly 1, which
`_scale_grad_kernel` detects on the device (no host sync): put loss weights inside the loss to get that case.
"""

import torch
import triton
import triton.language as tl

from kernels._dispatch import use_triton
from kernels._tiles import round_to, row_tiles


@triton.jit
def _scale_grad_kernel(
    g_ptr,  # (N, V) stored gradient, any float dtype, unit column stride; scaled in place
    scale_ptr,  # () or (N,) fp32 upstream gradient
    N,
    V,
    stride_g,
    PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK)
    if PER_ROW:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
    else:
        scale = tl.load(scale_ptr + rows * 0)  # the () upstream gradient, broadcast to the block's rows
    # An upstream gradient of exactly 1 (`loss.backward()` with the weights inside the loss) needs no pass over the
    # gradient: the programs return after one scalar read. A NaN upstream is not 1, so it still propagates.
    if tl.min(tl.where(scale == 1.0, 1, 0), axis=0) == 0:
        for start in range(0, V, BLOCK):
            mask = row_ok[:, None] & (start + cols < V)[None, :]
            ptrs = g_ptr + rows[:, None] * stride_g + (start + cols)[None, :]
            g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * scale[:, None]
            tl.store(ptrs, round_to(g, g_ptr.dtype.element_ty), mask=mask)


def scale_grad_(grad: torch.Tensor | None, grad_output: torch.Tensor) -> torch.Tensor | None:
    """grad (N, V) *= grad_output (() or (N,) per row), in place and without a host sync; free when it is 1."""
    if grad is None:
        return None
    per_row = grad_output.dim() == 1
    if use_triton(grad, grad_output) and grad.stride(1) == 1:
        n, v = grad.shape
        if n > 0:
            block_n, block, num_warps = row_tiles(v, grad.dtype)
            _scale_grad_kernel[(triton.cdiv(n, block_n),)](
                grad, grad_output.to(torch.float32).contiguous(), n, v, grad.stride(0),
                PER_ROW=per_row, BLOCK_N=block_n, BLOCK=block, num_warps=num_warps,
            )  # fmt: skip
        # Bump the version as an in-place op does: a second backward through a retained graph then fails autograd's
        # saved-tensor check instead of silently scaling the stored gradient twice.
        torch.autograd.graph.increment_version(grad)
        return grad
    return grad.mul_(grad_output[:, None] if per_row else grad_output)

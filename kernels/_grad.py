"""The backward shared by every loss that forms its gradient in the forward, and how that gradient survives fp16.

A loss that writes ∂loss/∂x during its forward (the KD+CE and cosine kernels) has a backward that only applies the
chain rule, grad ← grad · dy with dy the upstream gradient (a () tensor, or (N,) per row for reduction='none'). It
runs in place, so no second (N, V) buffer exists, and it costs nothing when the factor is exactly 1, which
`_scale_grad_kernel` detects on the device (no host sync): put loss weights inside the loss to get that case.

fp16 and loss scaling. fp16 training multiplies the loss by a scale S (2¹⁶ to start) so that small gradients land in
fp16's range: torch's gradient of fp16 logits under an fp32 loss is rn16(S·g). Ours is formed in the forward, before
S exists; rounded there at scale 1, every entry below 2⁻²⁴ flushes to 0 and entries below 2⁻¹⁴ keep few bits, and
multiplying by S afterwards cannot bring them back. So fp16 gradients are stored pre-multiplied by a power of two K
and the backward multiplies by dy/K instead of dy:

    stored = rn16(K·g),  K = 2^(15 − e) where B = m·2^e (m ∈ [½, 1)) bounds every |g| of the tensor,
    result = rn16(stored · dy/K)

B comes from the loss weights alone (|p_s − p_t| ≤ 1 and |q − onehot − ε/V| ≤ 1, so B = |kd_scale|·T + |ce_scale|):
a () device tensor, never read on the host; K·B ∈ [2¹⁴, 2¹⁵), so no stored entry reaches fp16's 65504, and K is a
power of two, so K·g and the division by K are exact. Accuracy, as a statement about the entries torch keeps
(S|g| ≥ 2⁻¹⁴, fp16's normal range): when S·B ≤ 2¹⁴ every such entry is normal in storage too, and the result is
within 2⁻¹¹ (two fp16 roundings, 0.05%) of the exact S·g; up to S·B ≤ 2¹⁸ the smallest of them sit in fp16's
subnormals with ≥ 7 bits, within 2⁻⁷ + 2⁻¹² < 1%. Torch's own fp16 gradient overflows once S·max|g| > 65504 ≈ 2¹⁶,
and a dynamic scaler keeps S·max|g| within a factor 2 of that, so the 1% bound fails only where B overstates the
largest gradient by more than 4× (a KD row whose student already matches its teacher, say) at such a scale, and then
only on entries below 2⁻¹⁰ of fp16's normal range. With a power-of-two S (the scaler's), the second rounding is
exact wherever the first was.
bf16 shares fp32's exponent range and fp32 needs nothing: K = 1 for both, and the free backward stays free. fp16
pays one pass in backward even when dy is 1 (fp16 without a loss scaler is not a training mode we tune for).
"""

import math

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


def grad_scale_for(dtype: torch.dtype, bound: torch.Tensor | float) -> torch.Tensor | float:
    """The factor K a forward multiplies its stored gradient by (see the module docstring): 1 unless fp16.

    K = 2^(15 − e) for the gradient bound B = m·2^e, m ∈ [½, 1): a float for a float B, a () fp32 tensor on B's
    device for a tensor B (computed there, no host sync). B = 0 (nothing to scale) and non-finite B give K = 2¹⁵;
    the exponent is clamped to keep K finite in fp32.
    """
    if dtype != torch.float16:
        return 1.0
    if not isinstance(bound, torch.Tensor):
        e = math.frexp(bound)[1] if math.isfinite(bound) else 0
        return math.ldexp(1.0, min(max(15 - e, -100), 100))
    _, e = torch.frexp(bound.to(torch.float32))
    return torch.ldexp(torch.ones_like(bound, dtype=torch.float32), (15 - e).clamp(-100, 100))


def scale_grad_(
    grad: torch.Tensor | None, grad_output: torch.Tensor, stored_scale: torch.Tensor | float = 1.0
) -> torch.Tensor | None:
    """grad (N, V) *= grad_output / stored_scale (grad_output () or (N,) per row), in place, without a host sync.

    `stored_scale` is the K the forward multiplied the stored gradient by (`grad_scale_for`); free when the factor
    is exactly 1.
    """
    if grad is None:
        return None
    if isinstance(stored_scale, torch.Tensor) or stored_scale != 1.0:
        grad_output = grad_output / stored_scale  # exact: K is a power of two
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

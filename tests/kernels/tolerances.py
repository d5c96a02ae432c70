"""Shared tolerances for the kernel tests and the accuracy rule of Cut Cross-Entropy.

`TOL[dtype]`: plain `assert_close` tolerances of an op against torch in fp32 / fp64 (output rounding only).
`RULE_SLACK[dtype]`: the `tol` of the accuracy rule |ours − fp64 truth| ≤ |torch in the same dtype − truth| + tol,
relative to the largest |truth| entry of the compared tensor (so one table serves losses and gradients).
"""

import torch

TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),  # 11-bit mantissa: one output rounding ≈ 5e-4 relative
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),  # 8-bit mantissa: one output rounding ≈ 4e-3 relative
}
RULE_SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute deviation from the truth (fp64), NaN-aware: a NaN counts as infinitely wrong."""
    d = (x.double() - truth.double()).abs()
    return float("inf") if d.isnan().any() else d.max().item() if d.numel() else 0.0


def assert_accuracy_rule(
    ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what="", scale=None
):
    """|ours − truth| ≤ |theirs − truth| + slack·scale, with `theirs` = torch computed in the same dtype.

    `scale` is max|truth| unless given: a result that is a difference of larger terms (0 up to rounding, say) needs
    the size of those terms instead."""
    if scale is None:
        scale = truth.double().abs().max().item() if truth.numel() else 0.0
    e_ours, e_theirs = max_err(ours, truth), max_err(theirs, truth)
    bound = e_theirs + RULE_SLACK[dtype] * max(scale, 1e-30)
    assert e_ours <= bound, (
        f"{what}: error {e_ours:.3e} > torch {e_theirs:.3e} + slack ({dtype}, max|truth| {scale:.3e})"
    )


def assert_grad_close(ours: torch.Tensor, truth: torch.Tensor, ulps: int = 32):
    """Gradients of two fp32 evaluations of the same formula: within `ulps` fp32 ulp of the largest |truth| entry
    (plus rtol 1e-5). Entries such as p_s − p_t cancel, so a small entry's error is set by the large ones, and a fixed
    atol flakes on fresh seeds (worst over 300 seeds of the sparse-vs-dense test: 1.2e-6 of the largest entry)."""
    scale = truth.double().abs().max().item() if truth.numel() else 0.0
    atol = ulps * torch.finfo(torch.float32).eps * scale
    torch.testing.assert_close(ours.double(), truth.double(), atol=atol, rtol=1e-5)

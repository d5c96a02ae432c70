"""Where an op runs: Triton on CUDA tensors; on CPU the Triton kernel only under Triton's interpreter.

Decided per call from the tensors and the environment, never at import time, and at one level for every op: the
row-level function of each family (`kd_ce_rows`, `cosine_rows`, `softmax_rows`, `softmax_rows_backward`,
`scale_grad_`) calls `use_triton` and runs either its launcher or its pure-PyTorch reference, which share one
signature. The autograd Functions above them never look at devices or dtypes.
"""

import os

import torch

# The floating dtypes the Triton kernels read and write; fp64 (the tests' "truth") runs the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether the Triton kernel (rather than the pure-PyTorch reference) should run on these tensors.

    Yes when every tensor is on CUDA, or on CPU under Triton's interpreter, and every floating tensor has a dtype
    in `KERNEL_DTYPES`. None entries (absent optional inputs) are skipped.
    """
    present = [t for t in tensors if t is not None]
    if any(t.is_floating_point() and t.dtype not in KERNEL_DTYPES for t in present):
        return False
    if all(t.is_cuda for t in present):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in present)

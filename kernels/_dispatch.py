"""Where an op runs: Triton on CUDA tensors; on CPU the Triton kernel only under Triton's interpreter.

Decided per call from the tensors and the environment, never at import time.
"""

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel (rather than the pure-PyTorch reference) should run on these tensors."""
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)

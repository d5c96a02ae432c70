"""Inputs and probes the kernel tests share."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def make_rows(n, v, dtype, device, scale=3.0):
    """Student/teacher logits of `dtype`, labels with ~30% ignored (-100), a KD mask with ~70% rows.

    Drawn on the CPU from the global generator, which the conftest seeds afresh on every run.
    """
    g = torch.default_generator
    s = (torch.randn(n, v, generator=g) * scale).to(dtype).to(device)
    t = (torch.randn(n, v, generator=g) * scale).to(dtype).to(device)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    m = torch.rand(n, generator=g) < 0.7
    return s, t, y.to(device), m.to(device)


class NoHostSync(TorchDispatchMode):
    """Fails on any op that copies a device scalar to the host (.item(), bool(tensor), int(tensor))."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))

"""Fixtures for the kernel tests: fresh random inputs, and which implementation runs (Triton or the pure-PyTorch
reference) on which device.

Every test draws its inputs from a seed that is new on each run (Cut Cross-Entropy's practice: an accuracy rule
checked on inputs nobody tuned it to). The seed is printed, so a failure shows it; `KERNEL_TEST_SEED=<n>` replays it.

`impl` ("triton" / "reference") is not autouse. Under "triton" the references inside the kernel modules are
replaced by tripwires, under "reference" the launchers are: a test can never pass on the path it did not mean to
take. Without CUDA the Triton path runs through Triton's interpreter (the root conftest sets TRITON_INTERPRET=1
before any kernel is decorated); the reference path is forced by TRITON_INTERPRET=0 at call time.
"""

import importlib
import os
import random

import pytest
import torch

from kernels._dispatch import use_triton

# importlib, not attribute access: the package re-exports the function `softmax`, which shadows the submodule.
_distill, _softmax, _cosine = (importlib.import_module(f"kernels.{m}") for m in ("distill", "softmax", "cosine"))
_REFERENCES = [
    (_distill, "kd_ce_rows_reference"),
    (_softmax, "softmax_reference"),
    (_softmax, "softmax_backward_reference"),
    (_cosine, "cosine_rows_reference"),
]
_LAUNCHERS = [
    (_distill, "kd_ce_fwd"),
    (_softmax, "softmax_fwd"),
    (_softmax, "softmax_bwd"),
    (_cosine, "cosine_fwd"),
]


_RUN_SEED = int(os.environ.get("KERNEL_TEST_SEED", random.SystemRandom().randrange(2**31)))


@pytest.fixture(autouse=True)
def _seed(request):
    """Overrides the root conftest's fixed seed: per run one seed, offset per test so tests do not share inputs."""
    seed = (_RUN_SEED + sum(map(ord, request.node.nodeid))) % 2**31
    print(f"KERNEL_TEST_SEED={_RUN_SEED} (this test: torch.manual_seed({seed}))")
    torch.manual_seed(seed)
    yield


def _tripwire(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran on a path meant to avoid it")

    return fail


@pytest.fixture(params=["triton", "reference"])
def impl(request, monkeypatch):
    """Run the test once on the Triton kernels and once on the references; returns the device to use."""
    if request.param == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        device = "cpu"
        patched = _LAUNCHERS
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        patched = _REFERENCES
    for module, name in patched:
        monkeypatch.setattr(module, name, _tripwire(name))
    assert use_triton(torch.empty(0, device=device)) == (request.param == "triton")
    return device


@pytest.fixture
def triton_impl(monkeypatch):
    """Only the Triton path (for kernel-specific behaviour); returns the device to use."""
    for module, name in _REFERENCES:
        monkeypatch.setattr(module, name, _tripwire(name))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert use_triton(torch.empty(0, device=device))
    return device

"""Engine tests run the kernels' pure-PyTorch path on CPU (fast); the kernels' own tests cover Triton."""

import pytest


@pytest.fixture(autouse=True)
def _reference_kernels_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")

"""Softmax / log-softmax with temperature (kernels/softmax.py) against torch and the fp64 truth, both paths."""

import math

import pytest
import torch

from kernels import LogSoftmax, Softmax, log_softmax, softmax
from tests.kernels.tolerances import DTYPES, TOL, assert_accuracy_rule, max_err

SHAPES = [(1, 1), (3, 7), (4097, 7), (41, 1271), (2, 30522), (1, 65537)]
TEMPERATURES = [0.5, 1.0, 2.0, 5.0]


def torch_op(log):
    return (lambda x, t: torch.log_softmax(x / t, -1)) if log else (lambda x, t: torch.softmax(x / t, -1))


def run(fn, x, temperature, upstream):
    """Output and input gradient of fn(x, T) for the given upstream gradient."""
    x = x.detach().clone().requires_grad_()
    y = fn(x, temperature)
    y.backward(upstream.to(y.dtype))
    return y.detach(), x.grad


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"{n}x{v}" for n, v in SHAPES])
def test_softmax_accuracy(impl, n, v, dtype, log):
    temperature = TEMPERATURES[(n + v) % 4]
    x = (torch.randn(n, v) * 3).to(dtype).to(impl)
    upstream = torch.randn(n, v, device=impl)  # random, non-unit upstream gradient
    ours = run(log_softmax if log else softmax, x, temperature, upstream)
    same = run(torch_op(log), x, temperature, upstream)
    truth = run(torch_op(log), x.double(), temperature, upstream.to(dtype).double())
    assert ours[0].dtype == ours[1].dtype == dtype
    for o, s, t, what in zip(ours, same, truth, ("y", "dx")):
        assert_accuracy_rule(o, s, t, dtype, what)
        tol = TOL[dtype]
        torch.testing.assert_close(o.double(), t, atol=tol["atol"] * t.abs().max().item(), rtol=tol["rtol"])


def test_neg_inf_entries(impl):
    x = torch.randn(3, 5000).to(impl)
    x[:, :4096] = -math.inf  # a whole first block of −inf, then the rest
    x[1, 4500:4600] = -math.inf
    for fn, ref in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        ours, grad = run(fn, x, 2.0, torch.ones_like(x))
        theirs, grad_t = run(lambda x, t, ref=ref: ref(x / t, -1), x, 2.0, torch.ones_like(x))
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
        torch.testing.assert_close(grad, grad_t, **TOL[torch.float32], equal_nan=False)


def test_non_contiguous_and_batched_inputs(impl):
    wide = torch.randn(4, 6, 300, device=impl)
    x = wide[:, :, :257]  # strided rows of a (B, L, V) tensor
    xt = torch.randn(257, 24, device=impl).t()  # column stride ≠ 1
    for inp in (x, xt):
        ours, grad = run(softmax, inp, 2.0, torch.ones_like(inp) * torch.arange(257.0, device=impl))
        theirs, grad_t = run(torch_op(False), inp, 2.0, torch.ones_like(inp) * torch.arange(257.0, device=impl))
        assert ours.shape == inp.shape
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
        torch.testing.assert_close(grad, grad_t, **TOL[torch.float32])


def test_broadcast_upstream_gradient(impl):
    """`.sum().backward()` hands backward an expanded dy (strides 0): it must be read, not assumed contiguous."""
    x = torch.randn(3, 40, device=impl)
    for fn, ref in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        (fn(x1, 2.0) * torch.arange(40.0, device=impl)).sum().backward()
        (ref(x2 / 2.0, -1) * torch.arange(40.0, device=impl)).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])
        x1.grad, x2.grad = None, None
        fn(x1, 2.0).sum().backward()
        ref(x2 / 2.0, -1).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_modules(impl):
    x = torch.randn(5, 33, device=impl)
    torch.testing.assert_close(Softmax(2.0)(x), torch.softmax(x / 2, -1), **TOL[torch.float32])
    torch.testing.assert_close(LogSoftmax(0.5)(x), torch.log_softmax(x / 0.5, -1), **TOL[torch.float32])


@pytest.mark.parametrize("temperature", [0.0, -2.0, math.inf])
def test_temperature_must_be_positive(temperature):
    x = torch.randn(2, 3)
    for fn in (softmax, log_softmax, Softmax, LogSoftmax):
        with pytest.raises(ValueError, match="temperature"):
            fn(x, temperature) if fn in (softmax, log_softmax) else fn(temperature)


@pytest.mark.parametrize("temperature", [1e-3, 0.1, 1.0, 20.0])
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5, -1e5])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("v", [500, 5000], ids=["one-tile", "two-tiles"])
def test_large_offsets_and_temperatures(impl, offset, temperature, log, v):
    """fp32 N(0, 1) + offset: output and gradient within 2× of torch fp32's error against fp64 (same inputs).

    Forming lse = m + log d and then z − lse rounds at |m|: at 1e4 that is ~1e-3 absolute, where torch is exact
    to ~1e-7; computing (x − m)/T − log d keeps every term at the size of the spread.
    """
    x = (torch.randn(4, v) + offset).to(impl)
    upstream = torch.randn(4, v, device=impl)
    ours = run(log_softmax if log else softmax, x, temperature, upstream)
    theirs = run(torch_op(log), x, temperature, upstream)
    truth = run(torch_op(log), x.double(), temperature, upstream.double())
    # 16 fp32 ulps of slack, as in test_distill's `within_twice_torch` (the defect is hundreds of them), of the
    # largest output, and for dx of the largest term it is made of: p·|dy|/T and p·|Σ dy·y|/T (softmax) or p·|Σ dy|/T
    # (log_softmax). Near a one-hot row (T = 1e-3) dx is a small difference of such terms, in torch as in ours.
    p, dy = (truth[0].exp() if log else truth[0]), upstream.double()
    c = dy.sum(-1, keepdim=True) if log else (dy * p).sum(-1, keepdim=True)
    terms = ((dy.abs() if log else p * dy.abs()) + p * c.abs()) / temperature
    for o, th, tr, size, what in zip(ours, theirs, truth, (truth[0].abs(), terms), ("y", "dx")):
        e_ours, e_torch = max_err(o, tr), max_err(th, tr)
        assert e_ours <= 2 * e_torch + 2**-20 * size.max().item(), f"{what}: {e_ours:.3e} vs torch {e_torch:.3e}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_gives_a_nan_row(impl):
    x = torch.randn(3, 5000, device=impl)
    x[1, 4500] = math.nan
    for fn, ref in ((softmax, torch.softmax), (log_softmax, torch.log_softmax)):
        y, dx = run(fn, x, 2.0, torch.ones_like(x))
        assert y[1].isnan().all() and dx[1].isnan().all()
        torch.testing.assert_close(y[[0, 2]], ref(x[[0, 2]] / 2.0, -1), **TOL[torch.float32])

"""LM-head-fused distillation / cross-entropy (kernels/fused_linear.py) against the unfused path.

The oracle is plain `torch.nn.functional` (projection → logits → KL / cross-entropy → autograd), in
fp64 for the "truth" of the bf16 accuracy rule. Each parity test runs twice: with `kd_ce_rows` on its
pure-PyTorch reference and on its Triton kernel (the shared `impl` fixture; Triton's interpreter on CPU, tiny shapes).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.distill import kd_ce_rows
from kernels.fused_linear import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    FusedLinearCrossEntropyLoss,
    FusedLinearDistillLoss,
    chunk_rows,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
)
from tests.kernels.tolerances import TOL, assert_accuracy_rule


@pytest.fixture
def device(impl):
    """The device of the shared `impl` fixture: each test runs on the Triton kernel and on the reference."""
    return impl


def make_inputs(n=37, h=16, h_t=24, v=131, device="cpu", bias=True, teacher=True, labels=True, mask=True):
    """Student (grad) and teacher (no grad) rows and projections, labels with ignored rows, a KD mask."""
    s = dict(
        h_s=torch.randn(n, h, device=device, requires_grad=True),
        w_s=(torch.randn(v, h, device=device) / h**0.5 * 3).requires_grad_(),
        b_s=torch.randn(v, device=device, requires_grad=True) if bias else None,
    )
    t = dict(h_t=None, w_t=None, b_t=None)
    if teacher:
        t = dict(
            h_t=torch.randn(n, h_t, device=device),
            w_t=torch.randn(v, h_t, device=device) / h_t**0.5 * 3,
            b_t=torch.randn(v, device=device) if bias else None,
        )
    y = None
    if labels:
        y = torch.randint(0, v, (n,), device=device)
        y[torch.rand(n, device=device) < 0.3] = -100
    m = torch.rand(n, device=device) < 0.7 if (mask and teacher) else None
    return {**s, **t, "labels": y, "kd_mask": m}


def cast(inp, dtype, keys=None):
    """inp with its floating tensors (those named in `keys`, default all) as `dtype` leaves, requires_grad kept."""
    keys = inp.keys() if keys is None else keys
    floating = {k: inp[k] for k in keys if inp[k] is not None and inp[k].is_floating_point()}
    return {**inp, **{k: x.detach().to(dtype).requires_grad_(x.requires_grad) for k, x in floating.items()}}


def unfused(h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature=2.0, kd_weight=1.0, ce_weight=1.0):
    """The unfused path: full logits, then DistilBERT's KD (T²·KL batchmean over KD rows) and CE (mean)."""
    s = F.linear(h_s, w_s, b_s)
    kd = ce = s.new_zeros((), dtype=torch.float32 if s.dtype != torch.float64 else s.dtype)
    if h_t is not None:
        t = F.linear(h_t, w_t, b_t)
        rows = torch.ones(len(s), dtype=torch.bool, device=s.device) if kd_mask is None else kd_mask
        kl = F.kl_div(F.log_softmax(s[rows] / temperature, -1), F.log_softmax(t[rows] / temperature, -1),
                      reduction="sum", log_target=True)  # fmt: skip
        kd = kl * temperature**2 / rows.sum().clamp_min(1)
    if labels is not None:
        ce = F.cross_entropy(s, labels, reduction="sum") / (labels != -100).sum().clamp_min(1)
    return kd_weight * kd + ce_weight * ce


STUDENT = ("h_s", "w_s", "b_s")


def loss_and_grads(fn, inp, upstream, **kw):
    """fn(**inp, **kw) as a loss, and its gradients for the student tensors under an upstream gradient."""
    loss = fn(**inp, **kw)
    loss = loss.loss if isinstance(loss, tuple) else loss
    wrt = [inp[k] for k in STUDENT if inp[k] is not None]
    return loss.detach(), torch.autograd.grad(loss, wrt, grad_outputs=upstream)


def fused(h_s, w_s, b_s, h_t, w_t, b_t, **kw):
    return fused_linear_distill_loss(h_s, w_s, b_s, h_t, w_t, b_t, **kw)


@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_parity_fp32(device, chunk_size, bias, temperature):
    inp = make_inputs(device=device, bias=bias)
    up = torch.rand((), device=device) + 0.5
    w = dict(temperature=temperature, kd_weight=0.7, ce_weight=1.3)
    loss, grads = loss_and_grads(fused, inp, up, chunk_size=chunk_size, **w)
    ref_loss, ref_grads = loss_and_grads(unfused, inp, up, **w)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


def test_parity_fp64_chunking_is_exact():
    """In fp64 (which `kd_ce_rows` always runs on its reference) the chunked algebra is exact to rounding."""
    inp = cast(make_inputs(), torch.float64)
    up = torch.tensor(1.3, dtype=torch.float64)
    (loss, grads), (ref_loss, ref_grads) = (
        loss_and_grads(fused, inp, up, chunk_size=6),
        loss_and_grads(unfused, inp, up),
    )
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float64])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("what", ["kd_only", "ce_only", "kd_no_mask"])
def test_single_terms(device, what):
    inp = make_inputs(device=device, teacher=what != "ce_only", labels=what != "kd_only", mask=what != "kd_no_mask")
    up = torch.randn((), device=device)
    loss, grads = loss_and_grads(fused, inp, up, chunk_size=16)
    ref_loss, ref_grads = loss_and_grads(unfused, inp, up)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy(device, label_smoothing):
    inp = make_inputs(device=device, teacher=False)
    args = (inp["h_s"], inp["w_s"], inp["b_s"], inp["labels"])
    loss = fused_linear_cross_entropy(*args, label_smoothing=label_smoothing, chunk_size=10)
    module = FusedLinearCrossEntropyLoss(label_smoothing=label_smoothing, chunk_size=10)(*args)
    ref = F.cross_entropy(F.linear(*args[:3]), args[3], label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    torch.testing.assert_close(module, ref, **TOL[torch.float32])
    grads = torch.autograd.grad(loss, args[:3])
    for g, r in zip(grads, torch.autograd.grad(ref, args[:3]), strict=True):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


@pytest.mark.parametrize("n", [0, 19])
def test_nothing_selected_gives_zero(device, n):
    inp = make_inputs(n=n, device=device)
    inp["kd_mask"][:] = False
    inp["labels"][:] = -100
    out = fused_linear_distill_loss(*(inp[k] for k in ("h_s", "w_s", "b_s", "h_t", "w_t", "b_t", "labels", "kd_mask")),
                                    chunk_size=8)  # fmt: skip
    assert out.loss.item() == out.kd.item() == out.ce.item() == 0.0
    for g in torch.autograd.grad(out.loss, [inp[k] for k in STUDENT]):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_accuracy_rule(device, autocast):
    """|ours − fp64 truth| ≤ |unfused PyTorch in the same dtype − fp64 truth| + tol, for loss and grads.

    Under autocast the student keeps fp32 masters; without it every tensor is bf16."""
    inp = make_inputs(n=45, h=32, h_t=48, v=257, device=device)
    inp = cast(inp, torch.bfloat16, ("h_t", "w_t", "b_t") if autocast else None)  # the teacher is held in bf16
    up = torch.randn((), device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        ours = loss_and_grads(fused, inp, up, chunk_size=16)
        torch_bf16 = loss_and_grads(unfused, inp, up)
    truth = loss_and_grads(unfused, cast(inp, torch.float64), up.double())
    assert [g.dtype for g in ours[1]] == [inp[k].dtype for k in STUDENT]
    for what, o, t, r in zip(("loss", *STUDENT), [ours[0], *ours[1]], [torch_bf16[0], *torch_bf16[1]],
                             [truth[0], *truth[1]], strict=True):  # fmt: skip
        assert_accuracy_rule(o, t, r, torch.bfloat16, what)


def test_tied_weights(device):
    """W_s shared with the word embeddings: the fused grad adds to the embedding's own, as autograd's does."""
    n, h, v = 29, 16, 97
    emb = torch.nn.Embedding(v, h, device=device)
    body = torch.nn.Linear(h, h, device=device)
    ids = torch.randint(0, v, (n,), device=device)
    inp = make_inputs(n=n, h=h, h_t=20, v=v, device=device)

    def grads(fn, **kw):
        emb.zero_grad(set_to_none=True)
        body.zero_grad(set_to_none=True)
        h_s = torch.tanh(body(emb(ids)))  # (N, H) depends on the embedding too
        loss = fn(**{**inp, "h_s": h_s, "w_s": emb.weight}, **kw)
        (loss.loss if isinstance(loss, tuple) else loss).backward()
        return emb.weight.grad.clone(), body.weight.grad.clone()

    for g, r in zip(grads(fused, chunk_size=8), grads(unfused), strict=True):
        torch.testing.assert_close(g, r, **TOL[torch.float32])


def test_module_and_eval(monkeypatch):
    import kernels.fused_linear as fl

    calls = []
    monkeypatch.setattr(fl, "kd_ce_rows", lambda *a, **kw: calls.append(kw["compute_grad"]) or kd_ce_rows(*a, **kw))
    inp = make_inputs()
    args = [inp[k] for k in ("h_s", "w_s", "b_s", "h_t", "w_t", "b_t", "labels", "kd_mask")]
    out = FusedLinearDistillLoss(temperature=3.0, kd_weight=0.5, ce_weight=2.0, chunk_size=7)(*args)
    ref = unfused(*args, temperature=3.0, kd_weight=0.5, ce_weight=2.0)
    torch.testing.assert_close(out.loss, ref, **TOL[torch.float32])
    torch.testing.assert_close(out.loss, 0.5 * out.kd + 2.0 * out.ce)
    assert calls and all(calls)
    calls.clear()
    with torch.no_grad():  # evaluation: no gradients are formed, same loss
        torch.testing.assert_close(FusedLinearDistillLoss(temperature=3.0, kd_weight=0.5, ce_weight=2.0)(*args).loss,
                                   out.loss.detach())  # fmt: skip
    assert calls == [False]


def test_rejects_teacher_with_grad_and_no_terms():
    inp = make_inputs()
    with pytest.raises(ValueError, match="teacher"):
        fused(**{**inp, "w_t": inp["w_t"].requires_grad_()})
    with pytest.raises(ValueError, match="needs a teacher"):
        fused(**{**inp, "h_t": None, "w_t": None, "b_t": None, "labels": None})


def test_chunk_rows():
    assert chunk_rows(16384, 30522, 4, DEFAULT_MEMORY_BUDGET_BYTES) == 2192
    assert chunk_rows(100, 30522, 4, DEFAULT_MEMORY_BUDGET_BYTES) == 100
    assert chunk_rows(0, 30522, 4, DEFAULT_MEMORY_BUDGET_BYTES) == 1
    assert chunk_rows(10**6, 10**9, 4, 2**20) == 1
    for budget in (2**20, 2**24, 2**28):
        rows = chunk_rows(10**6, 30522, 4, budget)
        assert rows * 30522 * 4 <= budget and (rows <= 8 or rows % 8 == 0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any aten op returns while active, backward included."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.nbytes = max([self.nbytes, *sizes])
        return out


@pytest.mark.parametrize("n", [32, 128])
def test_memory_no_rows_by_vocab_tensor(device, n):
    """Largest intermediate = one fp32 chunk × V, the same for every N; only O(N·H + V·H) is saved for backward."""
    h, v, chunk = 4, 1000, 8  # chunk·V = 8000 > V·H = 4000 > N·H, while N·V ≥ 32000
    inp = make_inputs(n=n, h=h, h_t=h, v=v, device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with _LargestTensor() as probe:
            out = fused(**inp, chunk_size=chunk)
            out.loss.backward()
    assert probe.nbytes == chunk * v * 4
    assert sum(saved) == n * h + v * h + v  # exactly the three gradients

    with _LargestTensor() as probe:  # the probe does see the unfused path's logits
        unfused(**inp).backward()
    assert probe.nbytes >= n * v * 4


@pytest.mark.gpu
def test_cuda_peak_memory_independent_of_n_and_no_sync():
    h, v, budget = 768, 30522, 64 * 2**20
    dev = "cuda"
    peaks = {}
    for n in (2048, 8192):
        inp = cast(make_inputs(n=n, h=h, h_t=h, v=v, device=dev), torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in forward or backward raises
        try:
            fused(**inp, memory_budget_bytes=budget).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        peaks[n] = torch.cuda.max_memory_allocated() - base
        # budget for the chunk logits, a few (V, H) fp32 / bf16 copies, the (N, H) gradients
        assert peaks[n] <= 2 * budget + 6 * v * h * 4 + 4 * n * h * 4, peaks
    # 6144 more rows add 6144·V·2 bytes (375 MB) of logits to an unfused path; here only O(N·H).
    assert peaks[8192] - peaks[2048] <= 6144 * h * 4 * 4, peaks

"""`torch.compile(fullgraph=True)` over a small model calling each public op: no graph break, our registered op in the
graph (not traced through, not fallen back), outputs and gradients equal to eager (`kernels._library`).

On the CPU both paths run inside the registered ops: "reference" (TRITON_INTERPRET=0, the pure-PyTorch references)
and "triton" (the Triton kernels under Triton's interpreter, which Dynamo could not trace: the registration is what
makes it compile). The backend is "aot_eager": AOTAutograd traces the fake implementations and the registered
backward exactly as Inductor would, and Inductor's C++ compile of even these tiny graphs takes ~1 min per graph on a
2-core machine. The `gpu` test runs the Triton kernels under Inductor on CUDA.
"""

import importlib

import pytest
import torch

import kernels

N, V, H, H_T, K = 6, 11, 8, 5, 4  # rows, vocabulary, student and teacher widths, stored teacher entries

# The ops each public function puts in the graph.
OPS = {
    "softmax": "softmax",
    "log_softmax": "softmax",
    "distill_loss": "kd_ce_loss",
    "kd_loss": "kd_ce_loss",
    "cross_entropy": "cross_entropy",
    "cosine_loss": "cosine_loss",
    "fused_linear_distill_loss": "fused_linear_distill_loss",
    "fused_linear_cross_entropy": "fused_linear_distill_loss",
    "sparse_distill_loss": "sparse_kd_ce_loss",
}


class Student(torch.nn.Module):
    """A linear head (the compiled model) and one public op on its output (the loss); returns a tuple whose first
    entry is backpropagated."""

    def __init__(self, op: str, device, dtype):
        super().__init__()
        self.op = op
        hidden = op == "cosine_loss" or op.startswith("fused_linear")  # these ops take hidden states, not logits
        self.proj = torch.nn.Linear(H, H if hidden else V, device=device, dtype=dtype)
        self.head = torch.nn.Parameter(torch.randn(V, H, device=device, dtype=dtype) / H**0.5)  # fused ops' W_s

    def forward(self, x, b):
        h = torch.tanh(self.proj(x))  # (N, V) logits, or (N, H) hidden states
        if self.op in ("softmax", "log_softmax"):
            y = getattr(kernels, self.op)(h, 2.0)
            return (y * b["up"]).sum(), y
        if self.op == "distill_loss":
            return tuple(kernels.distill_loss(h, b["t"], b["y"], b["m"], temperature=2.0, kd_weight=0.7, ce_weight=0.3))
        if self.op == "kd_loss":
            return (kernels.kd_loss(h, b["t"], b["m"], temperature=1.0),)
        if self.op == "cross_entropy":
            rows = kernels.cross_entropy(h, b["y"], label_smoothing=0.1, reduction="none")  # per-row upstream below
            return (rows * b["up"][:, 0]).sum(), rows
        if self.op == "cosine_loss":
            return (kernels.cosine_loss(h, b["t"][:, :H], b["m"]),)
        if self.op == "fused_linear_distill_loss":
            out = kernels.fused_linear_distill_loss(
                h, self.head, None, b["h_t"], b["w_t"], None, b["y"], b["m"], temperature=2.0, kd_weight=0.5,
                ce_weight=0.5, chunk_size=4,
            )  # fmt: skip
            return tuple(out)
        if self.op == "fused_linear_cross_entropy":
            return (kernels.fused_linear_cross_entropy(h, self.head, None, b["y"], chunk_size=4),)
        if self.op == "sparse_distill_loss":
            return tuple(kernels.sparse_distill_loss(h, b["tv"], b["ti"], b["lse"], b["y"], b["m"], temperature=2.0))
        raise ValueError(self.op)


def _inputs(op: str, device, dtype) -> tuple[torch.Tensor, dict]:
    x = torch.randn(N, H, device=device, dtype=dtype)
    t = torch.randn(N, V, device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), device=device)
    y[1] = -100  # an ignored row
    m = torch.rand(N, device=device) > 0.3
    m[0] = True
    tv, ti, lse = kernels.sparse_targets(t, K, 2.0)
    b = {"t": t, "y": y, "m": m, "up": torch.randn(N, V, device=device, dtype=dtype), "tv": tv, "ti": ti, "lse": lse,
         "h_t": torch.randn(N, H_T, device=device, dtype=dtype),
         "w_t": torch.randn(V, H_T, device=device, dtype=dtype)}  # fmt: skip
    return x, b


def _run(model, x, b):
    model.zero_grad(set_to_none=True)
    out = model(x, b)
    out[0].backward()
    return [o.detach() for o in out], [p.grad for p in model.parameters()]


class _GraphOps:
    """A Dynamo backend that notes the ops in the captured graph and hands it to another backend."""

    def __init__(self, backend: str):
        self.backend, self.targets = backend, set()

    def __call__(self, gm, example_inputs):
        self.targets |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def _check_compiled(op, device, dtype, backend, monkeypatch, rtol, atol):
    model = Student(op, device, dtype)
    x, b = _inputs(op, device, dtype)
    # Eager never takes the registered op (a tripwire on every entry of kernels._library).
    library = importlib.import_module("kernels._library")
    with monkeypatch.context() as patch:
        for name in set(OPS) & set(vars(library)):
            patch.setattr(library, name, lambda *a, **k: pytest.fail("eager went through kernels._library"))
        eager_out, eager_grads = _run(model, x, b)
    torch._dynamo.reset()
    capture = _GraphOps(backend)
    compiled = torch.compile(model, backend=capture, fullgraph=True)  # fullgraph: a graph break raises
    out, grads = _run(compiled, x, b)
    assert f"distill.{OPS[op]}.default" in capture.targets, sorted(capture.targets)
    assert len(out) == len(eager_out)
    for got, want in zip(out, eager_out):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for got, want in zip(grads, eager_grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    if len(out) == 3:  # DistillLossOutput: kd and ce are for logging, as in eager
        assert not out[1].requires_grad and not out[2].requires_grad


@pytest.mark.parametrize("path", ["reference", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_compiled_model_with_our_loss_has_no_graph_break_and_matches_eager(op, path, monkeypatch):
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    elif not torch.cuda.is_available() and not kernels._dispatch.interpreting():
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1 (set by the root conftest without CUDA)")
    # Loss weights given as numbers enter the compiled op as fp32 tensors: equal up to the rounding of w/n.
    _check_compiled(op, "cpu", torch.float32, "aot_eager", monkeypatch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["distill_loss", "cross_entropy", "cosine_loss", "sparse_distill_loss", "softmax"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_registered_ops_pass_opcheck(op, dtype, monkeypatch):
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration, AOT dispatch
    (16-bit inputs: the fake dtypes of fp32 losses beside 16-bit gradients, and fp16's stored factor K)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    library = importlib.import_module("kernels._library")
    s = torch.randn(N, V, dtype=dtype, requires_grad=True)
    x, b = _inputs(op, "cpu", dtype)
    w = torch.tensor(0.5)
    args = {
        "distill_loss": (library.kd_ce_loss, (s, b["t"], b["y"], b["m"], 2.0, w, w, -100, True)),
        "cross_entropy": (library.cross_entropy_op, (s, b["y"], -100, 0.1, "none", True)),
        "cosine_loss": (library.cosine_loss_op, (s, b["t"], b["m"], True)),
        "sparse_distill_loss": (library.sparse_kd_ce_loss, (s, b["tv"], b["ti"], b["lse"], b["y"], None, 2.0, w, w,
                                                            -100, True)),
        "softmax": (library.softmax_op, (s, 2.0, True)),
    }  # fmt: skip
    fn, a = args[op]
    torch.library.opcheck(fn, a)


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_model_with_our_loss_on_cuda_matches_eager(op, dtype, monkeypatch):
    """The Triton kernels inside the registered ops, under Inductor, against eager (the same kernels)."""
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 8e-3)}[dtype]
    _check_compiled(op, "cuda", dtype, "inductor", monkeypatch, *tol)

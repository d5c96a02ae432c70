"""The public ops as `torch.library` custom ops: under `torch.compile` each loss is one opaque op in the graph.

Why. Dynamo traces Python. It can trace the pure-PyTorch references, but not our launchers: host-side tile choices
around a Triton launch, a `data_ptr` comparison (the in-place check of `kernels.sparse_kd`), `increment_version`, or
Triton's interpreter. Without these ops a compiled model plus our loss breaks the graph on CUDA (and fails with
`fullgraph=True`). So each public function, after its host checks, branches to the op registered here while
compiling (`torch.compiler.is_compiling()`, a constant to Dynamo); eager calls never come here, and keep their
behaviour and cost.

What an op runs. Each forward op runs its family's own `autograd.Function.forward` (`_Ctx` stands in for autograd's
context), so no loss is written twice, and the device choice is the usual one: `kernels._dispatch.use_triton` picks
the Triton kernel on CUDA tensors (or under Triton's interpreter) and the pure-PyTorch reference elsewhere. The op
returns what that forward saves beside its outputs: the gradient formed in forward ((0,) when none is wanted) and
its fp16 factor K as a () fp32 tensor (`kernels._grad`). The registered backward applies the Function's chain rule
in plain tensor ops (stored gradient × upstream / K, one rounding), which AOTAutograd traces and Inductor fuses, and
`distill::softmax_backward` (the backward kernel) for softmax.

Fake implementations give every output's shape, dtype and device from the inputs' metadata, as the eager outputs
have them (losses in fp32, fp64 for fp64 inputs; loss = kd_weight·kd + ce_weight·ce promotes like eager's).

Under compile only: loss weights given as numbers enter the ops as () fp32 tensors on the input's device (the schemas
take tensors; eager's kernels receive them as such in any case), and `kd`/`ce` come back detached, as eager's
non-differentiable outputs.
"""

import torch
from torch import Tensor

from kernels.cosine import CosineLossFunction, grad_dtype
from kernels.cross_entropy import CrossEntropyLossFunction
from kernels.distill import KDCELossFunction
from kernels.fused_linear import FusedLinearDistillLossFunction
from kernels.softmax import softmax_rows, softmax_rows_backward
from kernels.sparse_kd import SparseKDCELossFunction


class _Ctx:
    """Autograd's ctx for a Function's forward run inside an op: says which inputs want a gradient, keeps what the
    forward saves."""

    def __init__(self, *needs_input_grad: bool):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *outputs):
        pass


def _acc(x: Tensor) -> torch.dtype:
    """The dtype of a loss over x: fp32, or fp64 for fp64 inputs (the reference's accumulation dtype)."""
    return torch.promote_types(torch.float32, x.dtype)


def _scalar(x: Tensor) -> Tensor:
    return x.new_empty((), dtype=_acc(x))


def _stored(g: Tensor | None, like: Tensor) -> Tensor:
    """The saved gradient, or (0,) when none was formed (a schema has no optional outputs)."""
    return like.new_empty((0,)) if g is None else g


def _factor(k: float | Tensor, like: Tensor) -> Tensor:
    """K as a fresh () fp32 tensor on like's device (filled there, no host copy)."""
    if isinstance(k, Tensor):
        return k.detach().to(device=like.device, dtype=torch.float32).reshape(()).clone()
    return torch.full((), float(k), dtype=torch.float32, device=like.device)


def _fake_grad(x: Tensor, compute_grad: bool, dtype: torch.dtype | None = None) -> Tensor:
    shape = x.shape if compute_grad else (0,)
    return x.new_empty(shape, dtype=dtype or x.dtype)  # contiguous, as the kernels and references return it


def _fake_factor(x: Tensor) -> Tensor:
    return x.new_empty((), dtype=torch.float32)


# ---- the backward every gradient-in-forward loss shares --------------------------------------------------------------


def _scaled_stored_grad(ctx, grad_output: Tensor) -> Tensor | None:
    """The stored gradient times grad_output / K, rounded once to its dtype: `kernels._grad.scale_grad_`'s arithmetic
    (fp32 product, one rounding), out of place. In place, as a mutating op, it would write an output of the forward
    op during the backward, which AOTAutograd's partitioner rejects when that output is live; so under compile the
    backward is one pointwise pass that Inductor fuses, without the kernel's free exit for an upstream of exactly 1."""
    if not ctx.compute_grad:
        return None
    grad, k = ctx.saved_tensors
    factor = (grad_output / k).to(torch.float32)
    return (grad.to(torch.float32) * (factor[:, None] if factor.dim() == 1 else factor)).to(grad.dtype)


def _save_stored_grad(ctx, inputs, output):
    """setup_context of the KD/CE ops: outputs (..., stored gradient, K); the last input is compute_grad."""
    ctx.save_for_backward(output[-2], output[-1])
    ctx.compute_grad, ctx.n_inputs = inputs[-1], len(inputs)


def _stored_grad_backward(ctx, grad_loss, *_):
    return (_scaled_stored_grad(ctx, grad_loss),) + (None,) * (ctx.n_inputs - 1)


# ---- KD + CE (distill_loss, kd_loss) ---------------------------------------------------------------------------------


@torch.library.custom_op("distill::kd_ce_loss", mutates_args=())
def kd_ce_loss(
    student: Tensor, teacher: Tensor | None, labels: Tensor | None, kd_mask: Tensor | None, temperature: float,
    kd_weight: Tensor, ce_weight: Tensor, ignore_index: int, compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`KDCELossFunction` forward on (N, V) rows: (loss, kd, ce, stored gradient, K)."""
    ctx = _Ctx(compute_grad)
    loss, kd, ce = KDCELossFunction.forward(ctx, student, teacher, labels, kd_mask, temperature, kd_weight, ce_weight,
                                            ignore_index)  # fmt: skip
    return loss, kd, ce, _stored(ctx.saved_tensors[0], student), _factor(ctx.grad_scale, student)


@kd_ce_loss.register_fake
def _(student, teacher, labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index, compute_grad):
    kd, ce = _scalar(student), _scalar(student)
    return kd_weight * kd + ce_weight * ce, kd, ce, _fake_grad(student, compute_grad), _fake_factor(student)


kd_ce_loss.register_autograd(_stored_grad_backward, setup_context=_save_stored_grad)


# ---- CE (cross_entropy) ----------------------------------------------------------------------------------------------


@torch.library.custom_op("distill::cross_entropy", mutates_args=())
def cross_entropy_op(
    logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float, reduction: str, compute_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """`CrossEntropyLossFunction` forward on (N, V) rows: (loss, stored gradient, K)."""
    ctx = _Ctx(compute_grad)
    out = CrossEntropyLossFunction.forward(ctx, logits, labels, ignore_index, label_smoothing, reduction)
    return out, _stored(ctx.saved_tensors[0], logits), _factor(ctx.grad_scale, logits)


@cross_entropy_op.register_fake
def _(logits, labels, ignore_index, label_smoothing, reduction, compute_grad):
    out = logits.new_empty(labels.shape if reduction == "none" else (), dtype=_acc(logits))
    return out, _fake_grad(logits, compute_grad), _fake_factor(logits)


cross_entropy_op.register_autograd(_stored_grad_backward, setup_context=_save_stored_grad)


# ---- sparse KD + CE (sparse_distill_loss) ----------------------------------------------------------------------------


@torch.library.custom_op("distill::sparse_kd_ce_loss", mutates_args=())
def sparse_kd_ce_loss(
    student: Tensor, topk_logits: Tensor, topk_indices: Tensor, teacher_lse: Tensor, labels: Tensor | None,
    kd_mask: Tensor | None, temperature: float, kd_weight: Tensor, ce_weight: Tensor, ignore_index: int,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`SparseKDCELossFunction` forward on (N, V) rows: (loss, kd, ce, stored gradient, K)."""
    ctx = _Ctx(compute_grad)
    loss, kd, ce = SparseKDCELossFunction.forward(ctx, student, topk_logits, topk_indices, teacher_lse, labels,
                                                  kd_mask, temperature, kd_weight, ce_weight, ignore_index)  # fmt: skip
    return loss, kd, ce, _stored(ctx.saved_tensors[0], student), _factor(ctx.grad_scale, student)


@sparse_kd_ce_loss.register_fake
def _(student, topk_logits, topk_indices, teacher_lse, labels, kd_mask, temperature, kd_weight, ce_weight,
      ignore_index, compute_grad):  # fmt: skip
    kd, ce = _scalar(student), _scalar(student)
    return kd_weight * kd + ce_weight * ce, kd, ce, _fake_grad(student, compute_grad), _fake_factor(student)


sparse_kd_ce_loss.register_autograd(_stored_grad_backward, setup_context=_save_stored_grad)


# ---- cosine (cosine_loss) --------------------------------------------------------------------------------------------


@torch.library.custom_op("distill::cosine_loss", mutates_args=())
def cosine_loss_op(student: Tensor, teacher: Tensor, mask: Tensor | None, compute_grad: bool) -> tuple[Tensor, Tensor]:
    """`CosineLossFunction` forward on (N, H) rows: (loss, stored gradient in `grad_dtype(student)`)."""
    ctx = _Ctx(compute_grad)
    loss = CosineLossFunction.forward(ctx, student, teacher, mask)
    return loss, _stored(ctx.saved_tensors[0], student)


@cosine_loss_op.register_fake
def _(student, teacher, mask, compute_grad):
    return _scalar(student), _fake_grad(student, compute_grad, grad_dtype(student))


def _cosine_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.compute_grad, ctx.dtype = inputs[-1], inputs[0].dtype


def _cosine_backward(ctx, grad_loss, _grad_stored):
    if not ctx.compute_grad:
        return None, None, None, None
    (grad,) = ctx.saved_tensors
    # CosineLossFunction.backward's grad.mul_(grad_loss).to(dtype), out of place: the same single rounding.
    return (grad * grad_loss).to(ctx.dtype), None, None, None


cosine_loss_op.register_autograd(_cosine_backward, setup_context=_cosine_setup)


# ---- softmax, log_softmax --------------------------------------------------------------------------------------------


@torch.library.custom_op("distill::softmax", mutates_args=())
def softmax_op(x: Tensor, temperature: float, log: bool) -> Tensor:
    """softmax(x/T) or log_softmax(x/T) over the last dim (`SoftmaxFunction` forward)."""
    return softmax_rows(x, temperature, log)


@softmax_op.register_fake
def _(x, temperature, log):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("distill::softmax_backward", mutates_args=())
def softmax_backward_op(y: Tensor, dy: Tensor, temperature: float, log: bool) -> Tensor:
    """The input gradient from the forward output y (`SoftmaxFunction` backward)."""
    return softmax_rows_backward(y, dy, temperature, log)


@softmax_backward_op.register_fake
def _(y, dy, temperature, log):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.temperature, ctx.log = inputs[1], inputs[2]


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_backward_op(y, dy, ctx.temperature, ctx.log), None, None


softmax_op.register_autograd(_softmax_backward, setup_context=_softmax_setup)


# ---- LM-head-fused KD + CE (fused_linear_distill_loss, fused_linear_cross_entropy) -----------------------------------


@torch.library.custom_op("distill::fused_linear_distill_loss", mutates_args=())
def fused_linear_distill_loss_op(
    h_s: Tensor, w_s: Tensor, b_s: Tensor | None, h_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None,
    labels: Tensor | None, kd_mask: Tensor | None, temperature: float, kd_weight: Tensor, ce_weight: Tensor,
    label_smoothing: float, ignore_index: int, chunk: int, dtype_s: torch.dtype, dtype_t: torch.dtype,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`FusedLinearDistillLossFunction` forward: (loss, kd, ce, K·∂L/∂h_s, K·∂L/∂W_s, K·∂L/∂b_s, K); each gradient
    (0,) where `needs_grad` (for h_s, W_s, b_s) says none is wanted."""
    ctx = _Ctx(*needs_grad)
    loss, kd, ce = FusedLinearDistillLossFunction.forward(
        ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature, kd_weight, ce_weight, label_smoothing,
        ignore_index, chunk, dtype_s, dtype_t, True,
    )  # fmt: skip
    grads = [_stored(g, h_s) for g in ctx.saved_tensors]
    return loss, kd, ce, *grads, _factor(ctx.grad_scale, h_s)


@fused_linear_distill_loss_op.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature, kd_weight, ce_weight, label_smoothing, ignore_index,
      chunk, dtype_s, dtype_t, needs_grad):  # fmt: skip
    acc = torch.promote_types(torch.float32, dtype_s)
    kd, ce = h_s.new_empty((), dtype=acc), h_s.new_empty((), dtype=acc)
    shapes = (h_s.shape, w_s.shape, (w_s.shape[0],))
    grads = [h_s.new_empty(shape if need else (0,), dtype=acc) for shape, need in zip(shapes, needs_grad)]
    return kd_weight * kd + ce_weight * ce, kd, ce, *grads, _fake_factor(h_s)


def _fused_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])
    ctx.needs_grad = inputs[-1]
    ctx.dtypes = [None if x is None else x.dtype for x in inputs[:3]]
    ctx.n_inputs = len(inputs)


def _fused_backward(ctx, grad_loss, *_):
    # FusedLinearDistillLossFunction.backward: the stored K·∂L/∂x times upstream/K, rounded once to x's dtype.
    *stored, k = ctx.saved_tensors
    factor = grad_loss / k
    grads = tuple((g * factor).to(d) if need else None for g, d, need in zip(stored, ctx.dtypes, ctx.needs_grad))
    return grads + (None,) * (ctx.n_inputs - 3)


fused_linear_distill_loss_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# ---- what the public functions call while compiling (inputs already checked and flattened) ---------------------------


def _weight(x: float | Tensor, like: Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.full((), float(x), dtype=torch.float32, device=like.device)


def _wants_grad(x: Tensor | None) -> bool:
    return x is not None and torch.is_grad_enabled() and x.requires_grad


def distill_loss(s, t, labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index) -> tuple:
    """`distill_loss` on (N, V) rows: (loss, kd, ce)."""
    loss, kd, ce, _, _ = kd_ce_loss(s, t, labels, kd_mask, temperature, _weight(kd_weight, s), _weight(ce_weight, s),
                                    ignore_index, _wants_grad(s))  # fmt: skip
    return loss, kd.detach(), ce.detach()


def cross_entropy(s, labels, ignore_index, label_smoothing, reduction) -> Tensor:
    """`cross_entropy` on (N, V) rows: the loss ((N,) for reduction 'none')."""
    return cross_entropy_op(s, labels, ignore_index, label_smoothing, reduction, _wants_grad(s))[0]


def sparse_distill_loss(s, tv, ti, lse, labels, kd_mask, temperature, kd_weight, ce_weight, ignore_index) -> tuple:
    """`sparse_distill_loss` on (N, V) rows: (loss, kd, ce)."""
    loss, kd, ce, _, _ = sparse_kd_ce_loss(s, tv, ti, lse, labels, kd_mask, temperature, _weight(kd_weight, s),
                                           _weight(ce_weight, s), ignore_index, _wants_grad(s))  # fmt: skip
    return loss, kd.detach(), ce.detach()


def cosine_loss(s, t, mask) -> Tensor:
    """`cosine_loss` on (N, H) rows."""
    return cosine_loss_op(s, t, mask, _wants_grad(s))[0]


def softmax(x, temperature, log) -> Tensor:
    """`softmax` / `log_softmax`."""
    return softmax_op(x, temperature, log)


def fused_linear_distill_loss(h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature, kd_weight, ce_weight,
                              label_smoothing, ignore_index, chunk, dtype_s, dtype_t) -> tuple:  # fmt: skip
    """`fused_linear_distill_loss` (arguments as its autograd Function's): (loss, kd, ce)."""
    needs_grad = [_wants_grad(x) for x in (h_s, w_s, b_s)]
    out = fused_linear_distill_loss_op(h_s, w_s, b_s, h_t, w_t, b_t, labels, kd_mask, temperature,
                                       _weight(kd_weight, h_s), _weight(ce_weight, h_s), label_smoothing,
                                       ignore_index, chunk, dtype_s, dtype_t, needs_grad)  # fmt: skip
    return out[0], out[1].detach(), out[2].detach()

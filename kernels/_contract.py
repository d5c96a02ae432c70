"""The input contract of every public op, checked once on the host before anything launches.

One checker for all ops, so that every message has the same form: the argument's name, what it got, and what it
needs. Only metadata is read (shapes, dtypes, devices, Python scalars): no check reads a device value, so none
syncs. What cannot be checked that way is a label's value; labels outside [0, V) are handled on the device and
poison their row with NaN (see `kernels.distill`).

Every violation raises ValueError.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _fail(name: str, need: str, got: object) -> None:
    raise ValueError(f"{name} must be {need}, got {got}")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return repr(x)


def tensor(
    name: str,
    x: object,
    kind: str = "float",
    shape: tuple[int, ...] | None = None,
    ndim: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that `x` is a tensor of `kind` ("float", "int" or "bool") with the given shape, ndim and device."""
    dtypes = {"float": FLOAT_DTYPES, "int": INT_DTYPES, "bool": (torch.bool,)}[kind]
    need = {
        "float": "a floating tensor (fp32, bf16, fp16 or fp64)",
        "int": "an integer tensor",
        "bool": "a bool tensor",
    }
    if not isinstance(x, torch.Tensor) or x.dtype not in dtypes:
        _fail(name, need[kind], _describe(x))
    if shape is not None and tuple(x.shape) != tuple(shape):
        _fail(name, f"of shape {tuple(shape)}", _describe(x))
    if ndim is not None and x.dim() != ndim:
        _fail(name, f"{ndim}-dimensional", _describe(x))
    if device is not None and x.device != device:
        _fail(name, f"on {device} (where the other inputs are)", _describe(x))
    return x


def optional_tensor(name: str, x: object, **kw) -> torch.Tensor | None:
    """`tensor` for an argument that may be None."""
    return None if x is None else tensor(name, x, **kw)


def logits(name: str, x: object) -> torch.Tensor:
    """A floating (..., V) tensor with V ≥ 1: logits, or hidden states, whose last dim is the row."""
    tensor(name, x, "float")
    if x.dim() < 1 or x.shape[-1] < 1:
        _fail(name, "a (..., V) tensor with V ≥ 1", _describe(x))
    return x


def like(name: str, x: object, ref: torch.Tensor, kind: str = "float") -> torch.Tensor:
    """A tensor of ref's shape and device (a teacher beside its student)."""
    return tensor(name, x, kind, shape=ref.shape, device=ref.device)


def per_row(name: str, x: object, ref: torch.Tensor, kind: str) -> torch.Tensor | None:
    """None, or one entry per row of the (..., V) tensor ref: shape ref.shape[:-1], on ref's device."""
    return optional_tensor(name, x, kind=kind, shape=ref.shape[:-1], device=ref.device)


def constant(name: str, x: torch.Tensor | None) -> None:
    """Teacher tensors are constants: a gradient into them would be silently dropped."""
    if x is not None and x.requires_grad:
        raise ValueError(
            f"{name} is a constant (the teacher's) and receives no gradient, but it requires grad: compute it under "
            "torch.no_grad() or pass .detach()"
        )


def topk_targets(ref: torch.Tensor, values: object, indices: object, lse: object) -> None:
    """A teacher stored sparsely beside (..., V) student logits `ref` (`kernels.sparse_kd`): (..., K) `topk_logits`
    and `topk_indices` with 1 ≤ K ≤ V, (...) `teacher_lse`; all on ref's device, no floating one requiring grad."""
    lead, v = tuple(ref.shape[:-1]), ref.shape[-1]
    tensor("topk_logits", values, "float", device=ref.device)
    k = values.shape[-1] if values.dim() else 0
    if tuple(values.shape[:-1]) != lead or not 1 <= k <= v:
        _fail("topk_logits", f"of shape {(*lead, 'K')} with 1 ≤ K ≤ V = {v}", tuple(values.shape))
    tensor("topk_indices", indices, "int", shape=values.shape, device=ref.device)
    tensor("teacher_lse", lse, "float", shape=lead, device=ref.device)
    constant("topk_logits", values)
    constant("teacher_lse", lse)


def real(name: str, x: object, low: float = -math.inf, high: float = math.inf, open_low: bool = False) -> float:
    """A finite host number in [low, high] ((low, high] with `open_low`) as a float.

    Accepts Python and NumPy numbers and 0-dim CPU tensors (reading those needs no device sync); rejects bools and
    tensors on an accelerator (reading one would wait for the device).
    """
    if isinstance(x, torch.Tensor) and x.dim() == 0 and x.device.type == "cpu" and x.dtype != torch.bool:
        value = x.item()
    elif isinstance(x, numbers.Real) and not isinstance(x, bool):
        value = float(x)
    else:
        need = "a number (Python, NumPy or a 0-dim CPU tensor; a device tensor would need a sync to read)"
        _fail(name, need, _describe(x))
    ok_low = value > low if open_low else value >= low
    if not (ok_low and value <= high and math.isfinite(value)):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        _fail(name, f"a finite number in {bounds}", repr(x))
    return float(value)


def temperature(x: object) -> float:
    """T > 0, finite."""
    return real("temperature", x, 0.0, math.inf, open_low=True)


def weight(name: str, x: object) -> float | torch.Tensor:
    """A loss weight: a finite host number, or a 0-dim floating tensor (left on its device, never read)."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or not x.is_floating_point():
            _fail(name, "a number or a 0-dim floating tensor", _describe(x))
        return x
    return real(name, x)


def integer(name: str, x: object, low: int | None = None) -> int:
    """A host integer (Python or NumPy; not bool), at least `low` when given."""
    if not isinstance(x, numbers.Integral) or isinstance(x, bool):
        _fail(name, "an integer" if low is None else f"an integer ≥ {low}", _describe(x))
    if low is not None and x < low:
        _fail(name, f"an integer ≥ {low}", repr(x))
    return int(x)


def choice(name: str, x: object, options: tuple[str, ...]) -> str:
    if x not in options:
        _fail(name, "one of " + ", ".join(repr(o) for o in options), repr(x))
    return x

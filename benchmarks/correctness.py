"""The oracle of `python -m benchmarks.gpu_check`: fp64 truths, an every-element checker, allocator poisoning, and the
ops and tile configurations it checks.

Each check builds fresh random inputs (never zeros), poisons the CUDA caching allocator so that every tensor the op
allocates starts as NaN bit patterns (0xFF bytes), runs our op through the public `kernels` API (forward, then a
backward with a non-unit upstream gradient where the op has one), and compares every element of every output with
a truth computed in fp64 from the same inputs. An element passes when

    |ours − truth| ≤ rtol·|truth| + atol·max(max|truth|, floor) + 16·eps_fp32·noise + tiny(dtype)/2

`rtol`/`atol` come from `TOL` by the output's dtype (losses and per-row losses are fp32 whatever the input dtype);
`floor` (losses: 1) and `noise` (gradients: the coefficient that bounds an entry, e.g. kd_weight·T / #KD rows) keep
the bound meaningful where the truth is 0 by symmetry (a one-column row); `tiny(dtype)/2` is half the smallest
subnormal (fp16: 3e-8), the floor of any rounding. A NaN or inf in ours never passes (the comparison is written so
that NaN fails), and a non-finite truth fails the check too (the inputs are drawn so that it cannot happen).

Large rows are compared in row chunks (≈2^27 elements of fp64 at a time), `max|truth|` taken per chunk.
"""

import dataclasses
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch

EPS32 = 2.0**-24
# (rtol, atol) by the dtype an output is stored in; losses are fp32 outputs of fp32 arithmetic on exact inputs.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),  # one rounding is ≤ 2^-12 relative: 4× margin for fp32 arithmetic before it
    torch.bfloat16: (1.6e-2, 8e-3),  # one rounding is ≤ 2^-9 relative; the kernel tests' bf16 tolerance
}
SWEEP_OPS = ("distill", "cross_entropy", "kd_loss", "softmax", "log_softmax", "cosine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# One width per power-of-two class (2^j + 1: a partial, masked tile), plus width 1; more than any tile holds.
LADDER = (1, *(2**j + 1 for j in range(15)))
CHUNK_ELEMENTS = 2**27  # fp64 elements per compared row chunk (1 GiB a tensor)
TEMPERATURE, KD_WEIGHT, CE_WEIGHT = 2.0, 5.0, 2.0  # the DistilBERT recipe's T, α_ce, α_mlm


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tiny(dtype: torch.dtype) -> float:
    """The smallest subnormal of `dtype` (fp16: 6e-8): the resolution of any rounding to it near 0."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


# ---- the checker ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Comparison:
    """Every element of one output against its fp64 truth, accumulated over row chunks (`add`), summarized by
    `result()`: ok, n (elements compared), n_bad, max_abs_err, err_over_bound (≤ 1 passes), worst (flat index)."""

    name: str
    dtype: torch.dtype  # the dtype ours is stored in (picks rtol/atol)
    floor: float = 0.0
    noise: float = 0.0
    n: int = 0
    n_bad: int = 0
    n_nonfinite: int = 0
    max_abs_err: float = 0.0
    err_over_bound: float = 0.0
    worst: int | None = None
    truth_nonfinite: int = 0
    shape_error: str | None = None

    def add(self, ours: torch.Tensor, truth: torch.Tensor) -> None:
        if tuple(ours.shape) != tuple(truth.shape):
            self.shape_error = f"shape {tuple(ours.shape)} != truth {tuple(truth.shape)}"
            return
        rtol, atol = TOL[self.dtype]
        o, t = ours.detach().to(torch.float64), truth.detach().to(torch.float64)
        self.truth_nonfinite += int((~torch.isfinite(t)).sum())
        scale = max(float(t.abs().max()) if t.numel() else 0.0, self.floor)
        bound = rtol * t.abs() + (atol * scale + 16 * EPS32 * self.noise + _tiny(self.dtype) / 2)
        err = (o - t).abs()
        good = err <= bound  # NaN compares False: a NaN (or a NaN-poisoned, unwritten element) never passes
        self.n_nonfinite += int((~torch.isfinite(o)).sum())
        bad = int((~good).sum())
        if t.numel():
            ratio = torch.where(good, err / bound.clamp_min(1e-300), torch.full_like(err, math.inf))
            k = int(ratio.reshape(-1).argmax())
            r = float(ratio.reshape(-1)[k])
            if r > self.err_over_bound or self.worst is None:
                self.err_over_bound, self.worst = r, self.n + k
            finite_err = err[torch.isfinite(err)]
            if finite_err.numel():
                self.max_abs_err = max(self.max_abs_err, float(finite_err.max()))
        self.n += t.numel()
        self.n_bad += bad

    @property
    def ok(self) -> bool:
        return self.shape_error is None and self.n_bad == 0 and self.truth_nonfinite == 0 and self.n > 0

    def result(self) -> dict:
        """{ok, n, max_abs_err, err_over_bound}; a failure adds n_bad, n_nonfinite, worst_index, the tolerance and
        whatever else went wrong."""
        r = {
            "ok": self.ok,
            "n": self.n,
            "max_abs_err": float(f"{self.max_abs_err:.4g}"),
            "err_over_bound": float(f"{self.err_over_bound:.4g}") if math.isfinite(self.err_over_bound) else "inf",
        }
        if not self.ok:
            rtol, atol = TOL[self.dtype]
            r.update(
                n_bad=self.n_bad,
                n_nonfinite=self.n_nonfinite,
                worst_index=self.worst,
                rtol=rtol,
                atol=atol,
                dtype=dtype_name(self.dtype),
                floor=self.floor,
                noise=self.noise,
            )
            if self.truth_nonfinite:
                r["truth_nonfinite"] = self.truth_nonfinite
            if self.shape_error:
                r["shape_error"] = self.shape_error
        return r


def compare(name: str, ours: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype | None = None, floor=0.0,
            noise=0.0) -> dict:  # fmt: skip
    """One output checked in one go (see `Comparison`); `dtype` defaults to ours'."""
    c = Comparison(name, dtype or ours.dtype, floor, noise)
    c.add(ours, truth)
    return c.result()


# ---- allocator poisoning --------------------------------------------------------------------------------------------


def poison_allocator(nbytes: int) -> None:
    """Leave the CUDA caching allocator holding only free blocks filled with 0xFF bytes (NaN in fp32, bf16 and fp16):
    one block of `nbytes` (large allocations are split from it) and 8 MiB of small-pool blocks. An output element
    that a kernel never writes then reads NaN and fails `Comparison`. No-op without CUDA."""
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    big = torch.empty(max(int(nbytes), 2**21), dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(2**19, dtype=torch.uint8, device="cuda").fill_(0xFF) for _ in range(16)]
    torch.cuda.synchronize()
    del big, small  # back to the cache, poisoned


def poison_selftest() -> dict:
    """Proof that `poison_allocator` works: fresh allocations of several sizes read back as 0xFF everywhere."""
    if not torch.cuda.is_available():
        return {"status": "skipped: no CUDA (CPU runs compare every element against a fresh fp64 truth)"}
    sizes = {"4 KiB": 2**12, "600 KiB": 600 * 2**10, "3 MiB": 3 * 2**20, "48 MiB": 48 * 2**20}
    poison_allocator(sum(sizes.values()) * 2)
    held = {k: torch.empty(v, dtype=torch.uint8, device="cuda") for k, v in sizes.items()}
    not_poisoned = {k: int((x != 0xFF).sum()) for k, x in held.items()}
    del held
    ok = not any(not_poisoned.values())
    return {"status": "pass" if ok else "fail", "bytes_not_poisoned": not_poisoned}


# ---- fp64 truths ----------------------------------------------------------------------------------------------------


def kd_ce_truth(s, t, y, T: float = 1.0, smoothing: float = 0.0, ignore_index: int = -100) -> dict:
    """Per-row fp64 terms of DistilBERT's KD + CE on logits (s, t: (R, V); y: (R,) or None).

    kd_row = T²·Σ p_t (log p_t − log p_s), g_kd = ∂kd_row/∂s = T (p_s − p_t) (p = softmax(·/T));
    ce_row = (1−ε)(lse(s) − s_y) + ε (lse(s) − mean s), g_ce = softmax(s) − (1−ε) onehot(y) − ε/V (0 if ignored).
    """
    s = s.detach().double()
    out = {}
    if t is not None:
        ls = torch.log_softmax(s / T, -1)
        lt = torch.log_softmax(t.detach().double() / T, -1)
        pt = lt.exp()
        out["kd_row"] = T * T * (pt * (lt - ls)).sum(-1)
        out["g_kd"] = T * (ls.exp() - pt)
    if y is not None:
        valid = y != ignore_index
        yy = torch.where(valid, y, torch.zeros_like(y)).long()
        lse = torch.logsumexp(s, -1)
        ce = (1 - smoothing) * (lse - s.gather(1, yy[:, None]).squeeze(1)) + smoothing * (lse - s.mean(-1))
        out["ce_row"] = torch.where(valid, ce, torch.zeros_like(ce))
        g = torch.softmax(s, -1) - smoothing / s.shape[1]
        g.scatter_add_(1, yy[:, None], torch.full_like(g[:, :1], -(1 - smoothing)))
        out["g_ce"] = torch.where(valid[:, None], g, torch.zeros_like(g))
    return out


# ---- the ops --------------------------------------------------------------------------------------------------------


def _randn(shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    """Standard normal values × scale rounded to `dtype`, never exactly 0 (a kernel that writes zeros cannot pass
    on inputs where zeros are right)."""
    x = torch.randn(shape, device=device, generator=gen).mul_(scale).to(dtype)
    return x.masked_fill_(x == 0, 1.0)


def _labels(n, v, device, gen, fraction) -> torch.Tensor:
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    y[torch.rand(n, device=device, generator=gen) > fraction] = -100
    y[0] = v // 2  # row 0 is labelled
    if n > 1:
        y[1] = -100  # row 1 is ignored
    return y


def _mask(n, device, gen) -> torch.Tensor:
    m = torch.rand(n, device=device, generator=gen) > 0.3
    m[0] = True
    if n > 2:
        m[2] = False
    return m


@dataclasses.dataclass
class Op:
    """One public op: `make` inputs, `run` ours (forward + backward), `truth` in fp64 for a slice of rows.

    `outputs` maps each output to "rows" (per-row tensor in the input dtype), "rows32" (per-row fp32) or "scalar"
    (whose truth is returned per chunk as a partial sum); `floor`/`noise` per output as in `Comparison`."""

    name: str
    make: Callable[..., dict]
    run: Callable[[dict], dict]
    truth: Callable[[dict, slice], dict]
    outputs: dict
    scales: Callable[[dict], dict]  # output → (floor, noise)


def _distill_make(n, v, dtype, device, gen, label_fraction=0.5):
    return {"s": _randn((n, v), dtype, device, gen, 3.0).requires_grad_(), "t": _randn((n, v), dtype, device, gen, 3.0),
            "y": _labels(n, v, device, gen, label_fraction), "m": _mask(n, device, gen), "up": 0.75}  # fmt: skip


def _distill_run(x):
    import kernels

    out = kernels.distill_loss(x["s"], x["t"], x["y"], x["m"], TEMPERATURE, KD_WEIGHT, CE_WEIGHT)
    out.loss.backward(torch.tensor(x["up"], device=x["s"].device))
    return {"loss": out.loss.detach(), "kd": out.kd.detach(), "ce": out.ce.detach(), "grad": x["s"].grad}


def _counts(x):
    n_kd = max(int(x["m"].sum()), 1) if x.get("m") is not None else max(x["s"].shape[0], 1)
    n_ce = max(int((x["y"] != -100).sum()), 1) if x.get("y") is not None else 1
    return n_kd, n_ce


def _distill_truth(x, rows):
    n_kd, n_ce = _counts(x)
    r = kd_ce_truth(x["s"][rows], x["t"][rows], x["y"][rows], TEMPERATURE)
    m = x["m"][rows]
    kd = torch.where(m, r["kd_row"], torch.zeros_like(r["kd_row"])).sum() / n_kd
    ce = r["ce_row"].sum() / n_ce
    grad = x["up"] * (KD_WEIGHT / n_kd * r["g_kd"] * m[:, None] + CE_WEIGHT / n_ce * r["g_ce"])
    return {"loss": KD_WEIGHT * kd + CE_WEIGHT * ce, "kd": kd, "ce": ce, "grad": grad}


def _distill_scales(x):
    n_kd, n_ce = _counts(x)
    coef = x["up"] * max(KD_WEIGHT * TEMPERATURE / n_kd, CE_WEIGHT / n_ce)
    return {"loss": (1.0, 0.0), "kd": (1.0, 0.0), "ce": (1.0, 0.0), "grad": (0.0, coef)}


SMOOTHING = 0.1


def _ce_make(n, v, dtype, device, gen, label_fraction=0.5):
    up = torch.rand(n, device=device, generator=gen) + 0.5  # per-row upstream gradient in [0.5, 1.5)
    return {"s": _randn((n, v), dtype, device, gen, 3.0).requires_grad_(),
            "y": _labels(n, v, device, gen, label_fraction), "up": up}  # fmt: skip


def _ce_run(x):
    import kernels

    rows = kernels.cross_entropy(x["s"], x["y"], label_smoothing=SMOOTHING, reduction="none")
    rows.backward(x["up"])
    return {"ce_rows": rows.detach(), "grad": x["s"].grad}


def _ce_truth(x, rows):
    r = kd_ce_truth(x["s"][rows], None, x["y"][rows], 1.0, SMOOTHING)
    return {"ce_rows": r["ce_row"], "grad": x["up"][rows].double()[:, None] * r["g_ce"]}


def _kd_make(n, v, dtype, device, gen, label_fraction=None):
    return {"s": _randn((n, v), dtype, device, gen, 3.0).requires_grad_(), "t": _randn((n, v), dtype, device, gen, 3.0),
            "m": _mask(n, device, gen)}  # fmt: skip


KD_T = 1.0  # kd_loss is checked at T = 1 (distill at T = 2): the other ONE_TEMP branch of the kernel


def _kd_run(x):
    import kernels

    loss = kernels.kd_loss(x["s"], x["t"], x["m"], KD_T)
    loss.backward()  # an upstream gradient of exactly 1: the gradient kernel's early-exit path
    return {"kd": loss.detach(), "grad": x["s"].grad}


def _kd_truth(x, rows):
    n_kd, _ = _counts(x)
    r = kd_ce_truth(x["s"][rows], x["t"][rows], None, KD_T)
    m = x["m"][rows]
    return {"kd": torch.where(m, r["kd_row"], torch.zeros_like(r["kd_row"])).sum() / n_kd,
            "grad": r["g_kd"] * m[:, None] / n_kd}  # fmt: skip


def _softmax_make(n, v, dtype, device, gen, label_fraction=None):
    return {"x": _randn((n, v), dtype, device, gen, 3.0).requires_grad_(), "dy": _randn((n, v), dtype, device, gen)}


def _softmax_run(log: bool):
    def run(x):
        import kernels

        fn = kernels.log_softmax if log else kernels.softmax
        y = fn(x["x"], TEMPERATURE)
        y.backward(x["dy"])
        return {"y": y.detach(), "dx": x["x"].grad}

    return run


def _softmax_truth(log: bool):
    def truth(x, rows):
        z = x["x"][rows].detach().double() / TEMPERATURE
        dy = x["dy"][rows].double()
        if log:
            y = torch.log_softmax(z, -1)
            dx = (dy - y.exp() * dy.sum(-1, keepdim=True)) / TEMPERATURE
        else:
            y = torch.softmax(z, -1)
            dx = y * (dy - (dy * y).sum(-1, keepdim=True)) / TEMPERATURE
        return {"y": y, "dx": dx}

    return truth


def _softmax_scales(log: bool):
    def scales(x):
        dy = float(x["dy"].double().abs().max())
        big = float(x["x"].detach().double().abs().max()) / TEMPERATURE + math.log(max(x["x"].shape[1], 1))
        dx = (dy + float(x["dy"].double().sum(-1).abs().max())) / TEMPERATURE if log else dy / TEMPERATURE
        return {"y": (0.0, big if log else 1.0), "dx": (0.0, dx)}

    return scales


def _cosine_make(n, h, dtype, device, gen, label_fraction=None):
    t = _randn((n, h), dtype, device, gen)
    s = (t.float() + _randn((n, h), torch.float32, device, gen)).to(dtype)  # correlated, as a student's rows
    s = s.masked_fill_(s == 0, 1.0).requires_grad_()
    return {"s": s, "t": t, "m": _mask(n, device, gen), "up": 1.25}


def _cosine_run(x):
    import kernels

    loss = kernels.cosine_loss(x["s"], x["t"], x["m"])
    loss.backward(torch.tensor(x["up"], device=x["s"].device))
    return {"loss": loss.detach(), "grad": x["s"].grad}


def _cosine_truth(x, rows):
    count = max(int(x["m"].sum()), 1)
    s, t, m = x["s"][rows].detach().double(), x["t"][rows].double(), x["m"][rows]
    ns, nt = s.norm(dim=-1).clamp_min(1e-8), t.norm(dim=-1).clamp_min(1e-8)
    cos = (s * t).sum(-1) / (ns * nt)
    g = -t / (ns * nt)[:, None] + (cos / (ns * ns))[:, None] * s
    return {"loss": torch.where(m, 1 - cos, torch.zeros_like(cos)).sum() / count,
            "grad": x["up"] * g * m[:, None] / count}  # fmt: skip


def _cosine_scales(x):
    count = max(int(x["m"].sum()), 1)
    ns = x["s"].detach().double().norm(dim=-1).clamp_min(1e-8)
    return {"loss": (1.0, 0.0), "grad": (0.0, x["up"] * float((1 / ns).max()) / count)}


def _rows_only(names, noise=1.0):
    return lambda x: {k: (0.0, noise) for k in names}


OPS = {
    "distill": Op("distill", _distill_make, _distill_run, _distill_truth,
                  {"loss": "scalar", "kd": "scalar", "ce": "scalar", "grad": "rows"}, _distill_scales),
    "cross_entropy": Op("cross_entropy", _ce_make, _ce_run, _ce_truth, {"ce_rows": "rows32", "grad": "rows"},
                        lambda x: {"ce_rows": (1.0, 0.0), "grad": (0.0, 1.5)}),
    "kd_loss": Op("kd_loss", _kd_make, _kd_run, _kd_truth, {"kd": "scalar", "grad": "rows"},
                  lambda x: {"kd": (1.0, 0.0), "grad": (0.0, KD_T / _counts(x)[0])}),
    "softmax": Op("softmax", _softmax_make, _softmax_run(False), _softmax_truth(False), {"y": "rows", "dx": "rows"},
                  _softmax_scales(False)),
    "log_softmax": Op("log_softmax", _softmax_make, _softmax_run(True), _softmax_truth(True),
                      {"y": "rows", "dx": "rows"}, _softmax_scales(True)),
    "cosine": Op("cosine", _cosine_make, _cosine_run, _cosine_truth, {"loss": "scalar", "grad": "rows"},
                 _cosine_scales),
}  # fmt: skip


def _out_dtype(kind: str, dtype: torch.dtype) -> torch.dtype:
    return dtype if kind == "rows" else torch.float32


def check_op(op_name: str, dtype: torch.dtype, n: int, width: int, device: str, seed: int = 0,
             label_fraction: float = 0.5) -> dict:  # fmt: skip
    """Run one op once at (n, width) on fresh inputs, poisoned outputs, and compare every element with fp64 truth.

    Returns {"status": "pass" | "fail", "outputs": {name: Comparison.result()}, "shape": [n, width], ...}.
    """
    op = OPS[op_name]
    gen = torch.Generator(device=device).manual_seed(seed)
    x = op.make(n, width, dtype, device, gen, label_fraction=label_fraction)
    out_bytes = n * width * dtype.itemsize
    poison_allocator(2 * out_bytes + 2**24)
    ours = op.run(x)
    if device == "cuda":
        torch.cuda.synchronize()
    scales = op.scales(x)
    comps = {k: Comparison(k, _out_dtype(kind, dtype), *scales[k]) for k, kind in op.outputs.items()}
    partial = {k: None for k, kind in op.outputs.items() if kind == "scalar"}
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    with torch.no_grad():
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            truth = op.truth(x, rows)
            for k, kind in op.outputs.items():
                if kind == "scalar":
                    partial[k] = truth[k] if partial[k] is None else partial[k] + truth[k]
                elif ours.get(k) is None:
                    comps[k].shape_error = "no output (None)"
                else:
                    comps[k].add(ours[k][rows], truth[k])
            del truth
        for k, total in partial.items():
            comps[k].add(ours[k], total)
    results = {k: c.result() for k, c in comps.items()}
    ok = all(r["ok"] for r in results.values())
    return {"status": "pass" if ok else "fail", "shape": [n, width], "outputs": results}


# ---- the launch configurations to cover ----------------------------------------------------------------------------


def tile_configs(dtype: torch.dtype) -> tuple[list[dict], str | None]:
    """One width per distinct launch configuration the launch heuristic can pick for rows of `dtype`.

    The heuristic is `kernels._tiles.row_tiles(width, dtype) → (BLOCK_N, BLOCK, num_warps)`, with a one-tile or a
    looping variant of each kernel (SINGLE_TILE = width ≤ BLOCK). It is private to `kernels/`: if it has moved or
    changed its signature, every width of `LADDER` is checked instead and the second value says why.
    """
    try:
        row_tiles = importlib.import_module("kernels._tiles").row_tiles
        configs: dict = {}
        for w in LADDER:
            block_n, block, warps = (int(v) for v in row_tiles(w, dtype))
            key = (block_n, block, warps, w <= block)
            configs.setdefault(key, {"width": w, "BLOCK_N": block_n, "BLOCK": block, "num_warps": warps,
                                     "single_tile": w <= block})  # fmt: skip
        return list(configs.values()), None
    except Exception as e:  # a rename or a new signature must not stop the check: fall back, and say so
        return [{"width": w} for w in LADDER], f"kernels._tiles.row_tiles unusable ({type(e).__name__}: {e})"


def sweep_rows(config: dict) -> int:
    """Rows for one configuration: three program blocks, the last one partial."""
    return 2 * config.get("BLOCK_N", 1) + 3


# ---- the sweep worker (a child process of gpu_check) ----------------------------------------------------------------


def run_sweep_job(op_name: str, dtype: torch.dtype, configs: list[dict], device: str, deadline: float, emit) -> None:
    """Check `op_name` in `dtype` at every configuration, emitting one record per configuration until `deadline`."""
    for i, config in enumerate(configs):
        if time.time() > deadline:
            return
        name = f"sweep/{op_name}/{dtype_name(dtype)}/w={config['width']}"
        t0 = time.perf_counter()
        try:
            r = check_op(op_name, dtype, sweep_rows(config), config["width"], device, seed=i)
            record = {"name": name, "phase": "correctness", "config": config, **r}
        except Exception as e:
            record = {"name": name, "phase": "correctness", "status": "error", "config": config,
                      "message": f"{type(e).__name__}: {e}"[:2000]}  # fmt: skip
        record["seconds"] = round(time.perf_counter() - t0, 3)
        emit(record)


def worker_main(argv: list[str]) -> int:
    """`python -m benchmarks.correctness JOBS.json OUT.jsonl`: the sweep jobs of one child process; one JSON line
    per finished configuration, flushed, so a child killed at the deadline has still reported what it did."""
    jobs_path, out_path = argv
    spec = json.loads(open(jobs_path).read())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with open(out_path, "a") as out:

        def emit(record):
            out.write(json.dumps(record) + "\n")
            out.flush()

        for job in spec["jobs"]:
            run_sweep_job(job["op"], DTYPES[job["dtype"]], job["configs"], device, spec["deadline"], emit)
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available():  # before `kernels` is imported (inside the ops): Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(worker_main(sys.argv[1:]))

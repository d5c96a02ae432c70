"""The figures of `python -m benchmarks.gpu_check`: timing, the device's ceilings, the three headlines measured side
by side, the byte and FLOP models their predictions come from, and the DESIGN.md targets they are read against.

Every function that measures takes the run (`benchmarks.gpu_check.Run`: its plan, device, budget and document) and
returns a dict for the run's JSON. Timing (`time_fn`): median and quartiles of CUDA-event-timed runs after warm-up,
no host sync between runs and L2 flushed before each; CPU runs use perf_counter (dry runs: figures of nothing).

Predictions: a memory-bound figure is its modelled bytes over the copy bandwidth measured in the same run, a
compute-bound one its FLOPs over the matmul rate measured in the same run (plus its bytes). Each provider's
`measured_over_predicted` then says how far it ran from its own model, and a missed target is explained by which
side of the ratio ran slower than modelled.
"""

import gc
import importlib
import importlib.util
import math
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks import correctness

HEADLINES = ("distill", "fused_linear", "e2e")
PROVIDER_FIELDS = ("status", "median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "reps", "spread")

# The DESIGN.md targets: (key, what, threshold, direction). "≥": value ≥ threshold meets it; "≤": value ≤ threshold.
TARGETS = [
    ("distill_of_copy", "KD+CE fwd+bwd (ours): GB/s as a fraction of the copy bandwidth", 0.85, "≥"),
    ("distill_vs_eager", "KD+CE fwd+bwd: speed vs eager PyTorch", 4.0, "≥"),
    ("distill_vs_compile", "KD+CE fwd+bwd: speed vs torch.compile", 1.5, "≥"),
    ("distill_vs_liger", "KD+CE fwd+bwd: speed vs Liger CE + KL chained", 2.0, "≥"),
    ("distill_extra_memory", "KD+CE: memory beyond inputs and gradient, fraction of the logits", 0.02, "≤"),
    ("fused_memory", "fused head: peak memory as a fraction of the unfused path's", 0.15, "≤"),
    ("fused_vs_eager", "fused head: speed vs the unfused path", 1.0, "≥"),
    ("fused_vs_liger", "fused head: speed vs Liger fused-linear JSD", 1.0, ">"),
    ("e2e_vs_eager", "end-to-end step: tokens/s vs transformers eager", 2.0, "≥"),
    ("e2e_mfu", "end-to-end step: MFU (ours)", 0.5, "≥"),
    ("e2e_memory", "end-to-end step: peak memory vs transformers eager", 0.5, "≤"),
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---- timing ---------------------------------------------------------------------------------------------------------


def summarize(times_ms: list[float], warmup: int) -> dict:
    """Median, quartiles and spread (IQR ÷ median) of per-run times in ms."""
    q = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [times_ms[0]] * 3
    med = statistics.median(times_ms)
    return {"median_ms": med, "iqr_ms": q[2] - q[0], "q1_ms": q[0], "q3_ms": q[2], "min_ms": min(times_ms),
            "max_ms": max(times_ms), "reps": len(times_ms), "warmup": warmup,
            "spread": (q[2] - q[0]) / med if med else None}  # fmt: skip


_L2_FLUSH: list = []


def time_fn(fn: Callable[[], object], warmup: int, reps: int) -> dict:
    """`summarize` of `reps` runs of fn after `warmup` runs; the first warm-up's seconds are `warmup_s`.

    CUDA: one event pair per run, no host sync between runs (launch overhead overlaps the previous run, as
    triton.testing.do_bench does), and a 256 MiB buffer zeroed before each run so no run finds its inputs in L2.
    CPU: perf_counter per run.
    """
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    first = None
    for i in range(warmup):
        fn()
        if i == 0:
            sync()
            first = time.perf_counter() - t0
    sync()
    times = []
    if cuda:
        if not _L2_FLUSH:
            _L2_FLUSH.append(torch.empty(2**28, dtype=torch.uint8, device="cuda"))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            _L2_FLUSH[0].zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    out = summarize(times, warmup)
    out["warmup_s"] = first
    return out


def peak_memory(fn: Callable[[], object]) -> dict:
    """Bytes allocated above what was held before one run of fn: at the peak, and still held after it (CUDA)."""
    if not torch.cuda.is_available():
        return {}
    sync()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return {"peak_MB": (torch.cuda.max_memory_allocated() - before) / 2**20,
            "held_after_MB": (torch.cuda.memory_allocated() - before) / 2**20}  # fmt: skip


def free_quietly() -> None:
    try:
        free()
    except Exception:  # a CUDA error poisons the context: later items will record it
        pass


def clean(x):
    """Non-finite floats as strings ("inf", "nan"): strict JSON has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


# ---- the ceilings ------------------------------------------------------------------------------------------------


def ceilings(run) -> dict:
    """Copy bandwidth and matmul rate measured now, with their spread: the denominators of every prediction."""
    cuda = run.device == "cuda"
    nbytes = 2**30 if cuda else 2**24

    def time_copy():
        src = torch.empty(nbytes, dtype=torch.uint8, device=run.device).fill_(1)
        dst = torch.empty_like(src)
        return time_fn(lambda: dst.copy_(src), warmup=3, reps=20 if cuda else 5)

    t = time_copy()
    copy = {**t, "bytes": 2 * nbytes, "GB_per_s": 2 * nbytes / (t["median_ms"] / 1e3) / 1e9,
            "what": "device-to-device copy, (read + write bytes) / median time"}  # fmt: skip
    dtype = torch.bfloat16 if cuda else torch.float32
    per_size = {}
    for n in (4096, 8192, 16384) if cuda else (128, 256):
        a = torch.randn(n, n, device=run.device).to(dtype)
        b = torch.randn(n, n, device=run.device).to(dtype)
        t = time_fn(lambda a=a, b=b: a @ b, warmup=3, reps=10 if cuda else 3)
        per_size[str(n)] = {**t, "TFLOP_per_s": 2 * n**3 / (t["median_ms"] / 1e3) / 1e12}
        del a, b
    best = max(per_size, key=lambda k: per_size[k]["TFLOP_per_s"])
    matmul = {"TFLOP_per_s": per_size[best]["TFLOP_per_s"], "dtype": correctness.dtype_name(dtype), "n": int(best),
              "per_size": per_size, "what": "best median of square matmuls (2·n³ FLOPs)"}  # fmt: skip
    free()
    run.data["ceilings"] = {"copy": copy, "matmul": matmul}
    return {"status": "pass", "copy_GB_per_s": copy["GB_per_s"], "matmul_TFLOP_per_s": matmul["TFLOP_per_s"]}


def copy_bw(run) -> float | None:
    return ((run.data.get("ceilings") or {}).get("copy") or {}).get("GB_per_s")


def matmul_rate(run) -> float | None:
    return ((run.data.get("ceilings") or {}).get("matmul") or {}).get("TFLOP_per_s")


# ---- the headlines ----------------------------------------------------------------------------------------------

# Bytes each provider moves per logit element in KD+CE forward + backward (b = logit bytes, f = 4): the models
# the predictions are made from. Eager: .float() of s and t (b + f each), s/T, log_softmax, t/T, softmax and CE's
# log_softmax (2f each), kl_div's pointwise product and its sum (4f); backward: kl_div (2f), two log_softmax
# backwards (3f each), the /T (2f), CE's scatter (f), the sum of the two gradients (3f), .float() (f + b).
DISTILL_BYTES = {
    "ours": (lambda b: 3 * b, "read s, read t, write the gradient: 3b (the floor)"),
    "eager": (lambda b: 3 * b + 31 * 4, "fp32 upcasts and ~12 unfused [N, V] passes: 3b + 31·4"),
    "compile": (lambda b: 5 * b, "Inductor at best: one reduction reading s, t and one pointwise pass: 5b"),
    "liger": (lambda b: 23 * b, "its CE (3b) + torch (log_)softmax of s/T, t/T and their backward + its KL: ~23b"),
}


def _skip_reason(e: BaseException) -> str:
    return f"skipped: {getattr(e, 'msg', None) or e}"


def _providers(run, res: dict, est: dict, setup: Callable, figures: Callable) -> None:
    """Time forward + backward of each provider's case, side by side, into res["providers"][provider].

    `setup(provider)` builds a `benchmarks.common.Case` (the benchmark suites' own factories: a `pytest.skip` there
    becomes "skipped: why"); Liger without its package is "absent", never guessed. `figures(provider, timing, memory,
    case)` adds the op's figures. An error or an out-of-memory is recorded for that provider and the next one runs.
    """
    import pytest

    for provider, est_s in est.items():
        entry = res["providers"][provider] = {"status": "running"}
        if provider == "liger" and importlib.util.find_spec("liger_kernel") is None:
            entry["status"] = "absent"
            continue
        if run.stopped or (run.device == "cuda" and run.remaining() < est_s):
            entry["status"] = f"skipped: {run.stopped or f'budget (needs ~{est_s} s)'}"
            continue
        case = None
        try:
            case = setup(provider)

            def step(case=case):
                for x in case.inputs:
                    x.grad = None
                case.forward().backward(case.grad_output)

            t = time_fn(step, run.plan.warmup, run.plan.reps)
            entry.update(t)
            for x in case.inputs:
                x.grad = None
            mem = peak_memory(step)
            entry.update(figures(provider, t, mem, case))
            entry["status"] = "measured"
        except pytest.skip.Exception as e:
            entry["status"] = _skip_reason(e)
        except Exception as e:
            record_failure(entry, e)
        finally:
            del case
            free_quietly()
        run.write()


def record_failure(entry: dict, e: Exception) -> None:
    """A measurement that did not finish: out of memory is a skip, anything else an error with its message."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        entry["status"] = f"skipped: out of memory ({str(e)[:200]})"
    else:
        entry["status"] = "error"
        entry["message"] = f"{type(e).__name__}: {e}"[:1000]


def headline_distill(run) -> dict:
    """KD+CE fwd+bwd at (N, V) bf16, every provider on the same shape in this process."""
    from benchmarks.test_bench_distill import setup_distill

    plan = run.plan
    dtype = correctness.DTYPES[plan.dtypes[0]]
    n, v = plan.rows, plan.vocabs[0]
    logits = n * v * dtype.itemsize
    bw = copy_bw(run)
    res = {"shape": {"N": n, "V": v, "dtype": plan.dtypes[0]}, "bytes_floor": 3 * logits,
           "floor_ms": 3 * logits / (bw * 1e9) * 1e3 if bw else None, "providers": {},
           "models": {k: m[1] for k, m in DISTILL_BYTES.items()}}  # fmt: skip
    run.data["headlines"]["distill"].update(res)

    def figures(provider, t, mem, case):
        sec = t["median_ms"] / 1e3
        out = {"GB_per_s": case.bytes["full"] / sec / 1e9}
        if bw:
            out["GB_per_s_of_copy"] = out["GB_per_s"] / bw
            out["predicted_ms"] = DISTILL_BYTES[provider][0](dtype.itemsize) * n * v / (bw * 1e9) * 1e3
            out["measured_over_predicted"] = t["median_ms"] / out["predicted_ms"]
        if mem:
            out["peak_MB"] = mem["peak_MB"]
            # beyond the inputs (held before) and the gradient (still held after): the provider's own temporaries
            out["extra_MB"] = mem["peak_MB"] - mem["held_after_MB"]
            out["extra_of_logits"] = out["extra_MB"] * 2**20 / logits
        return out

    est = {"ours": 5, "eager": 10, "liger": 30, "compile": 90}  # seconds, torch.compile's warm-up included
    _providers(run, res, est, lambda p: setup_distill(p, (n, v), dtype), figures)
    return {"status": "measured" if res["providers"]["ours"]["status"] == "measured" else "error", **res}


def headline_fused(run) -> dict:
    """LM-head-fused KD+CE: time and peak memory of ours vs the unfused path (and Liger's fused-linear JSD)."""
    from benchmarks.test_bench_fused_linear import setup_fused_linear

    plan = run.plan
    dtype = correctness.DTYPES[plan.dtypes[0]]
    n, h, v = plan.rows, plan.hidden[0], plan.vocabs[0]
    b, bw, mm = dtype.itemsize, copy_bw(run), matmul_rate(run)
    flops = 8 * n * h * v  # both projections forward; G·W_s and Gᵀ·h_s
    chunk = max(1, min(n, (256 * 2**20) // (v * 2 * b) // 8 * 8))  # kernels.fused_linear's default chunk
    models = {  # bytes per [N, V] element besides the matmuls; predicted peak memory in bytes; what they count
        "ours": (
            7 * b,
            chunk * v * 2 * b + v * h * (4 + b) + n * h * b + v * 4,
            "write s, t chunk logits (2b), KD+CE kernel (3b), G read by two matmuls (2b); peak: one chunk of both "
            "logits + fp32 and returned weight gradient + hidden gradient",
        ),
        "eager": (
            4 * b + DISTILL_BYTES["eager"][0](b),
            n * v * 5 * 4,
            "logits written and G read twice (4b) + eager KD+CE; peak: 3 saved fp32 [N, V] + 2 in backward",
        ),
        "liger": (DISTILL_BYTES["liger"][0](b), None, "its chunked fused-linear JSD (β = 0) + CE, modelled as its KL"),
    }
    res = {"shape": {"N": n, "H": h, "V": v, "dtype": plan.dtypes[0]}, "flops": flops, "logits_MB": n * v * b / 2**20,
           "providers": {}, "models": {k: m[2] for k, m in models.items()}}  # fmt: skip
    run.data["headlines"]["fused_linear"].update(res)

    def figures(provider, t, mem, case):
        out = {"TFLOP_per_s": flops / (t["median_ms"] / 1e3) / 1e12}
        per_elem, peak_model, _ = models[provider]
        if bw and mm:
            out["predicted_ms"] = (flops / (mm * 1e12) + per_elem * n * v / (bw * 1e9)) * 1e3
            out["measured_over_predicted"] = t["median_ms"] / out["predicted_ms"]
        if peak_model:
            out["predicted_peak_MB"] = peak_model / 2**20
        if mem:
            out["peak_MB"] = mem["peak_MB"]
        return out

    _providers(run, res, {"ours": 10, "eager": 15, "liger": 30},
               lambda p: setup_fused_linear(p, (n, h, v), dtype), figures)  # fmt: skip
    return {"status": "measured" if res["providers"]["ours"]["status"] == "measured" else "error", **res}


def headline_e2e(run) -> dict:
    """One DistilBERT-recipe step, ours vs transformers eager, with `benchmarks.test_bench_e2e`'s own setup."""
    e2e = importlib.import_module("benchmarks.test_bench_e2e")
    shape = run.plan.e2e_shape or next((s for s in e2e.E2E_SHAPES if s[1] == 128), e2e.E2E_SHAPES[0])
    t_cfg, s_cfg = e2e.ModelConfig.from_hf_dict(e2e.TEACHER), e2e.ModelConfig.from_hf_dict(e2e.STUDENT)
    mm = matmul_rate(run)
    res = {"shape": {"batch": shape[0], "seq_len": shape[1], "precision": e2e.PRECISION}, "teacher": e2e.TEACHER,
           "student": e2e.STUDENT, "providers": {}, "warmup_steps": e2e.WARMUP}  # fmt: skip
    run.data["headlines"]["e2e"].update(res)
    for provider in ("ours", "eager"):
        entry = res["providers"][provider] = {"status": "running"}
        if run.stopped or (run.device == "cuda" and run.remaining() < 25):
            entry["status"] = f"skipped: {run.stopped or 'budget'}"
            continue
        held_before = torch.cuda.memory_allocated() if run.device == "cuda" else 0
        contender = None
        try:
            contender = e2e.setup_e2e(provider, shape)
            t = time_fn(contender.step, e2e.WARMUP, run.plan.e2e_reps)
            tokens = contender.info["tokens"]
            flops = e2e.step_flops(t_cfg, s_cfg, *shape, rows=tokens)
            sec = t["median_ms"] / 1e3
            entry.update(t, tokens=tokens, flops=flops, tokens_per_s=tokens / sec, TFLOP_per_s=flops / sec / 1e12)
            entry.update({k: v for k, v in contender.info.items() if k not in entry})
            if mm:
                entry["MFU"] = flops / sec / 1e12 / mm
                entry["predicted_ms"] = flops / (mm * 1e12) * 1e3  # every FLOP at the matmul rate: MFU = 1
                entry["measured_over_predicted"] = t["median_ms"] / entry["predicted_ms"]
            if run.device == "cuda":
                sync()
                held_between = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                contender.step()
                sync()
                peak = torch.cuda.max_memory_allocated()
                entry["peak_MB"] = (peak - held_before) / 2**20
                entry["step_MB"] = (peak - held_between) / 2**20
            entry["status"] = "measured"
        except Exception as e:
            record_failure(entry, e)
        finally:
            del contender
            free_quietly()
        run.write()
    return {"status": "measured" if res["providers"]["ours"]["status"] == "measured" else "error", **res}


# ---- targets ------------------------------------------------------------------------------------------------------


def _p(data: dict, headline: str, provider: str) -> dict:
    p = ((data.get("headlines") or {}).get(headline) or {}).get("providers") or {}
    entry = p.get(provider) or {}
    return entry if entry.get("status") == "measured" else {}


def _ratio(a, b):
    return a / b if a is not None and b else None


def targets(data: dict) -> list[dict]:
    """Each DESIGN.md target with its measured value, whether it is met, by how much it is missed, and why."""
    d, fl, e2 = (lambda p, h=h: _p(data, h, p) for h in HEADLINES)
    values = {
        "distill_of_copy": (d("ours").get("GB_per_s_of_copy"), 1.0),
        "distill_vs_eager": (_ratio(d("eager").get("median_ms"), d("ours").get("median_ms")),
                             _ratio(d("eager").get("predicted_ms"), d("ours").get("predicted_ms"))),
        "distill_vs_compile": (_ratio(d("compile").get("median_ms"), d("ours").get("median_ms")),
                               _ratio(d("compile").get("predicted_ms"), d("ours").get("predicted_ms"))),
        "distill_vs_liger": (_ratio(d("liger").get("median_ms"), d("ours").get("median_ms")),
                             _ratio(d("liger").get("predicted_ms"), d("ours").get("predicted_ms"))),
        "distill_extra_memory": (d("ours").get("extra_of_logits"), 0.0),
        "fused_memory": (_ratio(fl("ours").get("peak_MB"), fl("eager").get("peak_MB")),
                         _ratio(fl("ours").get("predicted_peak_MB"), fl("eager").get("predicted_peak_MB"))),
        "fused_vs_eager": (_ratio(fl("eager").get("median_ms"), fl("ours").get("median_ms")),
                           _ratio(fl("eager").get("predicted_ms"), fl("ours").get("predicted_ms"))),
        "fused_vs_liger": (_ratio(fl("liger").get("median_ms"), fl("ours").get("median_ms")), None),
        "e2e_vs_eager": (_ratio(e2("ours").get("tokens_per_s"), e2("eager").get("tokens_per_s")), None),
        "e2e_mfu": (e2("ours").get("MFU"), None),
        "e2e_memory": (_ratio(e2("ours").get("peak_MB"), e2("eager").get("peak_MB")), None),
    }  # fmt: skip
    why_providers = {"distill": ("ours", "eager", "compile", "liger"), "fused": ("ours", "eager", "liger"),
                     "e2e": ("ours", "eager")}  # fmt: skip
    out = []
    for key, what, threshold, direction in TARGETS:
        value, predicted = values[key]
        t = {"name": key, "what": what, "target": f"{direction} {threshold:g}", "threshold": threshold,
             "value": value, "predicted": predicted, "met": None, "miss": None}  # fmt: skip
        if value is not None and not data.get("dry_run"):
            met = (
                value >= threshold
                if direction == "≥"
                else value > threshold
                if direction == ">"
                else (value <= threshold)
            )
            t["met"] = bool(met)
            if not met:
                t["miss"] = (f"{value / threshold - 1:.0%} over {direction} {threshold:g}" if direction == "≤" else
                             f"{1 - value / threshold:.0%} short of {direction} {threshold:g}")  # fmt: skip
                group = key.split("_")[0]
                h = {"distill": "distill", "fused": "fused_linear", "e2e": "e2e"}[group]
                ratios = {p: _p(data, h, p).get("measured_over_predicted") for p in why_providers[group]}
                t["why"] = "measured ÷ predicted: " + ", ".join(
                    f"{p} {r:.2f}×" for p, r in ratios.items() if r is not None
                )  # which side ran slower than its bytes/FLOPs model
        elif data.get("dry_run"):
            t["note"] = "dry run: CPU figures, not measurements"
        out.append(clean(t))
    return out

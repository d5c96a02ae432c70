"""Every Triton entry kernel compiled for sm_90 (H100/H200) on the CPU, at every launch the heuristic can pick.

On a machine without CUDA the kernel tests run through Triton's interpreter, which executes the kernels' Python and
forgives what the compiler does not: a construct the compiler cannot lower, a loop-carried value that changes type,
a tile that needs more registers than a thread has. Triton compiles for a GPU it does not see (ptxas and cuobjdump
ship inside the triton wheel), so this test compiles what the launchers would launch, for sm_90, with each Triton
version the project meets: the one installed (the newest, in CI) and 3.6.0, the GPU machine's (beside torch 2.11).

How a launch becomes a compile. A child process (so that TRITON_INTERPRET is unset when `triton.jit` decorates the
kernels; the root conftest sets it in this process) imports `kernels`, replaces each entry kernel's `run` by a
recorder, and calls the real launchers (`softmax_fwd`, `kd_ce_fwd`, ...) on CPU tensors of each configuration's
shape. The recorded arguments go through Triton's own binder (`create_function_from_signature`, then
`JITFunction._pack_args`, as `JITFunction.run` does), so the signature, the constexprs and the 16-divisibility
specialization of pointers and integers are those of a real launch; then `triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32), options=...)`. Registers and local memory are read from the cubin with the wheel's
`cuobjdump -res-usage` (so a warm Triton cache, which skips ptxas, still reports them): REG is what
`CompiledKernel.n_regs` reads from the driver on a GPU, and STACK + LOCAL the per-thread local memory, of which
`n_spills` is a quarter. Spilled registers live in the stack frame: rerunning ptxas -v with Triton's own flags
(-lineinfo --regAllocOptLevel=2) on the PTX gives the same frame and "N bytes spill stores" to match. `shared` is the
dynamic shared memory Triton launches with (`metadata.shared`).

What is compiled, per Triton version:
  - configurations: the widths of `benchmarks.correctness.tile_configs(dtype)`, one row width per distinct
    (BLOCK_N, BLOCK, num_warps, SINGLE_TILE) that `kernels._tiles.row_tiles` can pick, for fp32, bf16 and fp16 (the
    gpu_check sweep's enumeration, reused); `sweep_rows(config)` rows. The KD+CE launchers pick their own tiles
    (`kd_ce_tiles`, `sparse_kd_tiles`), which like `row_tiles` depend on the width only through its next power of
    two: these widths (one per power-of-two class up to the largest tile) reach each of their tiles too, and every
    launch is labelled with the tiles it was launched with;
  - strides: each width is odd (2^j + 1), so with contiguous rows no integer is divisible by 16; a second launch
    reads the same rows from a buffer padded to a multiple of 16 columns (strided rows, as the ops accept), which
    specializes the row strides as divisible by 16. The compiled code differs (vector width, address arithmetic),
    and so do its registers;
  - switches: the launch with every optional input and branch on ("all": the most live state) at every
    configuration, dtype and stride class, and each other switch setting the ops launch (one flag off at a time) at
    every configuration and dtype with odd strides.

The table in benchmarks/results/sm90_resources.md is written by

    python -m tests.kernels.test_compile_sm90 --markdown benchmarks/results/sm90_resources.md

(both Triton versions; `--records DIR` keeps the JSON lines, `--reuse` rewrites the table from them). Triton 3.6.0 is
looked for as a pip `--target` directory, `.cache/triton-3.6.0/` (git-ignored), put ahead of the venv's triton on
PYTHONPATH (the launchers run on the venv's torch; only the compiler differs):

    python -m pip install --no-deps --target .cache/triton-3.6.0 triton==3.6.0

Cost: 1227 compiles per version, ~0.6 s of CPU each without a warm Triton cache (~6 min per version on 2 idle
cores), ~11 s per version with one (~/.triton/cache).
"""

import argparse
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIDE_TRITONS = {"3.6.0": ROOT / ".cache" / "triton-3.6.0"}  # the GPU machine's Triton, beside torch 2.11
INSTALL_HINT = "python -m pip install --no-deps --target .cache/triton-{v} triton=={v}"
# Local memory (bytes per thread; spilled registers live there) a launch may use, by kernel; 0 for any other. None
# now. The KD+CE kernels spilled up to 48 B (_kd_ce) and 400 B (_sparse_kd_ce) on 16-bit tiles of 4096 values over
# 16 warps (128 registers a thread) with odd row strides: their tiles are now `kernels._tiles.kd_ce_tiles` and
# `sparse_kd_tiles` (at most 2048 values in a tile of several rows). The sparse kernel also spilled 4-40 B far below
# the register limit (40-160 registers) where ptxas, given no cap, keeps its own register target: it is launched
# with `maxnreg` = one program's share of the register file (`kernels._tiles.register_cap`).
SPILL_BOUND_BYTES: dict[str, int] = {}
MARKDOWN = "benchmarks/results/sm90_resources.md"
REGISTER_FILE = 65536  # 32-bit registers per SM on sm_90: regs × threads per program must fit (255 per thread at most)


# ---- the child process: record the launches, compile them ------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    kernel: str  # the entry kernel's name
    setting: str  # the switch setting ("all", or which flag is off)
    dtype: str
    config: dict  # width, BLOCK_N, BLOCK, num_warps, single_tile: the tiles the launcher picked at this width
    strides: str  # "odd" or "16": the row strides' divisibility
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)


def _rows(n, w, dtype, strides, fill=0.0):
    """(n, w) CPU tensor of `dtype`; with strides "16" a column slice of a buffer padded to 16 columns."""
    import torch

    cols = w if strides == "odd" else -(-w // 16) * 16
    return torch.full((n, cols), fill, dtype=dtype)[:, :w]


def _settings(flags: dict, coupled: dict | None = None):
    """("all", flags), then each flag turned off in turn (with the flags that cannot stay on without it)."""
    yield "all", dict(flags)
    for name in flags:
        off = {name: False}
        off.update({k: False for k in (coupled or {}).get(name, ())})
        yield f"no {name}", {**flags, **off}


def _launches(dtype_name: str, config: dict, strides: str):
    """(kernel, setting, thunk) for every launch of one configuration: each thunk calls the real launcher. With
    strides "16" only the "all" setting (the stride class changes the code, not which branches exist)."""
    import importlib

    import torch

    from benchmarks.correctness import DTYPES, sweep_rows

    distill, softmax, cosine, grad, sparse = (
        importlib.import_module(f"kernels.{m}") for m in ("distill", "softmax", "cosine", "_grad", "sparse_kd")
    )
    dtype = DTYPES[dtype_name]
    n, w = sweep_rows(config), config["width"]

    def pick(settings):
        return settings if strides == "odd" else itertools.islice(settings, 1)

    for name, f in pick(_settings({"log": True})):
        x = _rows(n, w, dtype, strides)
        yield "_softmax_fwd_kernel", name, lambda x=x, f=f: softmax.softmax_fwd(x, 2.0, f["log"])
        yield "_softmax_bwd_kernel", name, lambda x=x, f=f: softmax.softmax_bwd(x, x, 2.0, f["log"])

    labels = torch.zeros(n, dtype=torch.int64)
    mask = torch.ones(n, dtype=torch.bool)
    flags = {"teacher": True, "labels": True, "kd_mask": True, "smoothing": True, "temperature": True, "grad": True}
    for name, f in pick(_settings(flags, {"teacher": ("kd_mask",), "labels": ("smoothing",)})):
        s, t = _rows(n, w, dtype, strides), _rows(n, w, dtype, strides)
        yield "_kd_ce_fwd_kernel", name, lambda s=s, t=t, f=f: distill.kd_ce_fwd(
            s, t if f["teacher"] else None, labels if f["labels"] else None, mask if f["kd_mask"] else None,
            2.0 if f["temperature"] else 1.0, 1.0, 1.0, 0.1 if f["smoothing"] else 0.0, -100, f["grad"], None,
        )  # fmt: skip

    for name, f in pick(_settings({"mask": True, "grad": True})):
        s, t = _rows(n, w, dtype, strides, 1.0), _rows(n, w, dtype, strides, 1.0)
        yield (
            "_cosine_fwd_kernel",
            name,
            lambda s=s, t=t, f=f: cosine.cosine_fwd(s, t, mask if f["mask"] else None, 0.5, f["grad"]),
        )

    for name, f in pick(_settings({"per_row": True})):
        g = _rows(n, w, dtype, strides)
        up = torch.full((n,) if f["per_row"] else (), 0.5)
        yield "_scale_grad_kernel", name, lambda g=g, up=up: grad.scale_grad_(g, up)

    # Sparse KD: K = V − 1 (a tail; the widest K-block at this width) or K = V (none); fp32 values, int32 ids and an
    # fp32 log-sum-exp, as `sparse_targets` makes them; GATHERED is the in-place launch (grad_out = student).
    flags = {"labels": True, "kd_mask": True, "smoothing": True, "temperature": True, "tail": w > 1,
             "gathered": True, "grad": True}  # fmt: skip
    for name, f in pick(_settings(flags, {"labels": ("smoothing",), "grad": ("gathered",)})):
        if name == "no tail" and w == 1:
            continue  # K = V = 1 is "all" already
        k = w - 1 if f["tail"] else w
        s = _rows(n, w, dtype, strides)
        tv = _rows(n, k, torch.float32, strides)
        ti = torch.arange(k, dtype=torch.int32).expand(n, k).contiguous()
        lse = torch.zeros(n)
        yield "_sparse_kd_ce_fwd_kernel", name, lambda s=s, tv=tv, ti=ti, lse=lse, f=f: sparse.sparse_kd_ce_fwd(
            s, tv, ti, lse, labels if f["labels"] else None, mask if f["kd_mask"] else None,
            2.0 if f["temperature"] else 1.0, 1.0, 1.0, 0.1 if f["smoothing"] else 0.0, -100, f["grad"],
            s if f["gathered"] else None,
        )  # fmt: skip


def entry_kernels() -> dict:
    """name → JITFunction of every `*_kernel` in `kernels/` (the entry points; helpers are device functions)."""
    import importlib
    import pkgutil

    import triton

    import kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.JITFunction):
                found[name] = obj
    return found


def record_launches() -> list[Launch]:
    """Call every launcher at every configuration with the kernels' `run` replaced by a recorder."""
    import torch

    from benchmarks.correctness import DTYPES, tile_configs

    kernels_by_name = entry_kernels()
    current: list[Launch] = []

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            current.append(Launch(fn.__name__, "", "", {}, "", args, kwargs))

        return run

    for fn in kernels_by_name.values():
        fn.run = recorder(fn)
    # `scale_grad_` dispatches itself; here every dispatch goes to its launcher (CPU tensors, no interpreter).
    import kernels._grad

    kernels._grad.use_triton = lambda *tensors: True

    launches = []
    for dtype_name in DTYPES:
        configs, why = tile_configs(DTYPES[dtype_name])
        if why:
            raise RuntimeError(why)
        for config, strides in itertools.product(configs, ("odd", "16")):
            for kernel, setting, thunk in _launches(dtype_name, config, strides):
                current.clear()
                with torch.no_grad():
                    thunk()
                assert len(current) == 1 and current[0].kernel == kernel, (kernel, setting, current)
                tiles = _launched_tiles(current[0], config)
                launches.append(dataclasses.replace(current[0], setting=setting, dtype=dtype_name, config=tiles,
                                                    strides=strides))  # fmt: skip
    missing = set(kernels_by_name) - {x.kernel for x in launches}
    if missing:
        raise RuntimeError(f"entry kernels no launch reaches (add them to _launches): {sorted(missing)}")
    return launches


def _launched_tiles(launch: Launch, config: dict) -> dict:
    """The configuration as launched: the launcher's own BLOCK_N, BLOCK and num_warps at the configuration's width
    (the KD+CE launchers do not take `row_tiles`' tiles), and whether the row fits one tile."""
    kw = launch.kwargs
    tiles = {k: kw.get(k, config[k]) for k in ("BLOCK_N", "BLOCK", "num_warps")}
    return {**config, **tiles, "single_tile": bool(kw.get("SINGLE_TILE", config["width"] <= tiles["BLOCK"]))}


def _resources(cubin: bytes, cuobjdump: str) -> dict:
    """REG, STACK, LOCAL, SHARED (static) of the one function in a cubin, from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if "REG:" in x)
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", line)}


_JOBS: list = []


def _compile(i: int) -> dict:
    """Compile launch i of `_JOBS` for sm_90 through Triton's binder, as `JITFunction.run` would; its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    launch, fn = _JOBS[i]
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    t0 = time.perf_counter()
    rec = {"kernel": launch.kernel, "setting": launch.setting, "dtype": launch.dtype, "strides": launch.strides,
           **{k: launch.config[k] for k in ("width", "BLOCK_N", "BLOCK", "num_warps", "single_tile")}}  # fmt: skip
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        res = _resources(compiled.asm["cubin"], triton.knobs.nvidia.cuobjdump.path)
        rec.update(ok=True, regs=res["reg"], stack=res["stack"], local=res["local"], shared=compiled.metadata.shared,
                   warps=compiled.metadata.num_warps)  # fmt: skip
        rec["BLOCK_K"] = next((v for k, v in constexprs.items() if fn.arg_names[k[0]] == "BLOCK_K"), None)
    except Exception as e:  # recorded, not raised: the test lists every failure
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:3000])
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def worker_main(argv: list[str]) -> int:
    """`python -m tests.kernels.test_compile_sm90 --worker OUT.jsonl [--jobs J]`: one JSON line
    per compile, after a first line describing the toolchain (or saying why the backend cannot load)."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args(argv)
    out = open(a.worker, "w")

    def emit(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the compile check must not run the interpreter"
    try:
        import triton
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas

        if "nvidia" not in backends:
            raise RuntimeError("Triton's nvidia backend is not installed")
        ptxas = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True, check=True)
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
        subprocess.run([cuobjdump, "--version"], capture_output=True, check=True)
    except Exception as e:
        emit({"unavailable": f"{type(e).__name__}: {e}"})
        return 0
    ptxas_version = re.findall(r"release ([\d.]+)", ptxas.stdout)
    emit({"triton": triton.__version__, "triton_path": str(Path(triton.__file__).parent), "source": _source(),
          "ptxas": ptxas_version[0] if ptxas_version else ptxas.stdout.strip()[-80:]})  # fmt: skip

    global _JOBS
    kernels_by_name = entry_kernels()
    _JOBS = [(x, kernels_by_name[x.kernel]) for x in record_launches()]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(a.jobs) as pool:
        for rec in pool.imap_unordered(_compile, range(len(_JOBS))):
            emit(rec)
    return 0


# ---- the parent: run the child per Triton version --------------------------------------------------------------------


def compile_all(version: str, out: Path, jobs: int = 2) -> tuple[dict, list[dict]]:
    """Run the child for one Triton ("installed", or a key of SIDE_TRITONS); (toolchain header, compile records)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton ≥ 3.9 warns unless told; 1 is every version's default
    if version != "installed":
        env["PYTHONPATH"] = os.pathsep.join([str(SIDE_TRITONS[version]), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "tests.kernels.test_compile_sm90", "--worker", str(out), "--jobs", str(jobs)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"compile child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return lines[0], lines[1:]


def _summary(header: dict, records: list[dict]) -> str:
    ok = [r for r in records if r["ok"]]
    top = max(ok, key=lambda r: r["regs"], default=None)
    text = f"Triton {header['triton']} (ptxas {header['ptxas']}): {len(ok)}/{len(records)} compiled"
    if top:
        text += (f", max {top['regs']} registers ({top['kernel']} {top['dtype']} BLOCK_N={top['BLOCK_N']} "
                 f"BLOCK={top['BLOCK']} warps={top['num_warps']} {top['setting']}), max local "
                 f"{max(map(_stack, ok))} B, max shared {max(r['shared'] for r in ok)} B")  # fmt: skip
    return text


@pytest.mark.parametrize("version", ["installed", *SIDE_TRITONS])
def test_every_launch_compiles_for_sm90_within_the_spill_bound(version, tmp_path):
    if version != "installed" and not SIDE_TRITONS[version].is_dir():
        pytest.skip(f"Triton {version} not found at {SIDE_TRITONS[version]}: " + INSTALL_HINT.format(v=version))
    pytest.importorskip("triton")
    header, records = compile_all(version, tmp_path / "compile.jsonl")
    if "unavailable" in header:
        pytest.skip(f"Triton cannot compile for sm_90 here: {header['unavailable']}")
    if version != "installed":
        assert header["triton"] == version, f"{SIDE_TRITONS[version]} holds Triton {header['triton']}"
    print(_summary(header, records))
    failed = [r for r in records if not r["ok"]]
    assert not failed, f"{len(failed)} launches did not compile for sm_90; first: {json.dumps(failed[0], indent=1)}"
    assert {r["kernel"] for r in records} == set(_expected_kernels())
    spills = [r for r in records if _stack(r) > SPILL_BOUND_BYTES.get(r["kernel"], 0)]
    assert not spills, f"{len(spills)} launches spill past SPILL_BOUND_BYTES; worst: {max(spills, key=_stack)}"
    over = [r for r in records if r["regs"] * r["warps"] * 32 > REGISTER_FILE]
    assert not over, f"programs that need more registers than an SM has: {over[:3]}"


def _stack(r):
    return r["stack"] + r["local"]


def _expected_kernels():
    """Entry kernels by source text (this process imports `kernels` under the interpreter, whose objects differ)."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        names.update(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    return names


# ---- the Markdown table ----------------------------------------------------------------------------------------------


def markdown(runs: list[tuple[dict, list[dict]]], source: str) -> str:
    """One table per kernel: a row per (dtype, configuration), per Triton version the maximum over switch settings
    and stride classes of registers, local memory (stack + local) and dynamic shared memory; then every launch that
    uses local memory."""
    versions = [h["triton"] for h, _ in runs]
    lines = [
        "# sm_90 resources of every kernel launch (compiled on the CPU)",
        "",
        f"Written by `python -m tests.kernels.test_compile_sm90 --markdown {MARKDOWN}` from {source};",
        "`tests/kernels/test_compile_sm90.py` compiles the same launches in CI and fails on a compile error or on",
        "local memory beyond `SPILL_BOUND_BYTES`. Every launch the launchers make at one width per power of two",
        "(`benchmarks.correctness.tile_configs`: each tile configuration of `kernels._tiles.row_tiles`, which reach",
        "every tile of `kd_ce_tiles` and `sparse_kd_tiles` too; each row shows the tiles the launcher picked there),",
        "in fp32, bf16 and fp16, went through Triton's own binder and `triton.compile(...,",
        "target=GPUTarget('cuda', 90, 32))` (sm_90a) without a GPU. Registers and local memory come from",
        "`cuobjdump -res-usage` on the cubin: REG is what `CompiledKernel.n_regs` reads on a GPU; spilled registers",
        "live in the stack frame, so local = STACK + LOCAL bytes per thread (`n_spills` would be local / 4). Shared is",
        "Triton's dynamic shared memory (`metadata.shared`, bytes per program). A program of w warps can have at most",
        "65536 / (32·w) registers a thread (128 at 16 warps), and ptxas spills beyond that.",
        "",
        "Each cell is `regs / local B / shared B`, the maximum over the switch settings (every optional input and",
        "branch on, and each one off in turn) and both stride classes (the odd width with contiguous rows, where no",
        "stride is divisible by 16, and the same rows in a buffer padded to 16 columns).",
        "",
    ]
    for h, recs in runs:
        lines.append(f"- {_summary(h, recs)}")
    lines.append("")
    spills: dict = {}
    for v, (_, recs) in zip(versions, runs):
        for r in recs:
            if r["ok"]:
                key = (r["kernel"], r["dtype"], r["width"], r["BLOCK_N"], r["BLOCK"], r["num_warps"])
                spills.setdefault(key, {}).setdefault(v, []).append(r)
    spills = {k: by_v for k, by_v in spills.items() if any(_stack(r) for rs in by_v.values() for r in rs)}
    if spills:
        head = "| kernel | dtype | width | BLOCK_N | BLOCK | warps | " + " | ".join(f"Triton {v}" for v in versions)
        lines += ["## Configurations with spills", "",
                  "Per Triton version: the most local memory of any launch at the configuration, how many of its",
                  "launches (switch settings × stride classes) use any, and the worst launch's setting and strides.",
                  "", head + " |", "|" + " --- |" * (6 + len(versions))]  # fmt: skip
        for key in sorted(spills, key=lambda k: (k[0], k[1], k[2])):
            cells = []
            for v in versions:
                rs = spills[key].get(v, [])
                worst = max(rs, key=_stack, default=None)
                n = sum(1 for r in rs if _stack(r))
                cells.append(
                    f"{_stack(worst)} B, {n} of {len(rs)} ({worst['setting']}, {worst['strides']})" if n else "0"
                )
            lines.append(f"| `{key[0]}` | " + " | ".join(map(str, key[1:])) + " | " + " | ".join(cells) + " |")
        lines.append("")
    by_kernel: dict = {}
    for (_, recs), v in zip(runs, versions):
        for r in recs:
            key = (r["dtype"], r["BLOCK_N"], r["BLOCK"], r["num_warps"], r["single_tile"], r["width"])
            by_kernel.setdefault(r["kernel"], {}).setdefault(key, {}).setdefault(v, []).append(r)
    dtype_order = {"float32": 0, "bfloat16": 1, "float16": 2}
    for kernel in sorted(by_kernel):
        lines += [f"## `{kernel}`", "", "| dtype | width | BLOCK_N | BLOCK | warps | one tile | "
                  + " | ".join(f"Triton {v}" for v in versions) + " |",
                  "|" + " --- |" * (6 + len(versions))]  # fmt: skip
        for key in sorted(by_kernel[kernel], key=lambda k: (dtype_order[k[0]], k[5])):
            cells = []
            for v in versions:
                recs = by_kernel[kernel][key].get(v, [])
                good = [r for r in recs if r["ok"]]
                if not recs:
                    cells.append("–")
                elif len(good) < len(recs):
                    cells.append(f"**{len(recs) - len(good)} failed**")
                else:
                    cells.append(f"{max(r['regs'] for r in good)} / {max(map(_stack, good))} / "
                                 f"{max(r['shared'] for r in good)}")  # fmt: skip
            dtype, block_n, block, warps, single, width = key
            lines.append(f"| {dtype} | {width} | {block_n} | {block} | {warps} | {'yes' if single else 'no'} | "
                         + " | ".join(cells) + " |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _source() -> str:
    """The commit the kernels were compiled at, and whether kernels/ differed from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kernels"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "a copy without git"
    return f"`kernels/` at commit {head}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Compile every kernel launch for sm_90 and write the resource table.")
    p.add_argument("--markdown", type=Path, required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--records", type=Path, help="keep each version's JSON lines in this folder")
    p.add_argument("--reuse", action="store_true", help="read the JSON lines already in --records instead of compiling")
    a = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.records or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for version in ["installed", *SIDE_TRITONS]:
            if version != "installed" and not SIDE_TRITONS[version].is_dir():
                print(f"skipping Triton {version}: " + INSTALL_HINT.format(v=version), file=sys.stderr)
                continue
            path = folder / f"sm90-{version}.jsonl"
            if a.reuse and path.exists():
                header, *records = [json.loads(x) for x in path.read_text().splitlines()]
            else:
                header, records = compile_all(version, path, jobs=a.jobs)
            if "unavailable" in header:
                print(f"skipping {version}: {header['unavailable']}", file=sys.stderr)
                continue
            print(_summary(header, records), file=sys.stderr)
            runs.append((header, records))
    runs.sort(key=lambda x: [int(p) for p in re.findall(r"\d+", x[0]["triton"])[:3]])
    sources = {h.get("source", _source()) for h, _ in runs}
    a.markdown.write_text(markdown(runs, " and ".join(sorted(sources))))
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))

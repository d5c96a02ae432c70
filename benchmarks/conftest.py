"""pytest-benchmark hooks: every saved result file says what it was measured on and against which ceilings.

(Environment switches, such as TRITON_INTERPRET without CUDA, and the seeding fixture live in the root conftest.)

    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/<device>-<date>.json
    python -m benchmarks.run          # the same, with the file name chosen for you, then RESULTS.md rebuilt

The JSON is pytest-benchmark's own (per benchmark: group, params, stats with median, IQR, stddev, min, max,
rounds, and our `extra_info`), plus:

    machine_info["device"]    `benchmarks.record.device_info()`: name, capability, driver, versions, commit, and the
                              measured copy bandwidth and matmul peak
    per benchmark extra_info  `GB_per_s_of_copy` and `TFLOP_per_s_of_matmul`: the achieved figure as a fraction of
                              those measured ceilings
"""

import gc

import pytest
import torch

from benchmarks import record


def pytest_benchmark_update_machine_info(config, machine_info):
    # Called only when pytest-benchmark saves a file, so CPU smoke runs never pay for the measurements.
    machine_info["device"] = record.device_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    device = output_json.get("machine_info", {}).get("device") or record.device_info()
    copy_bw = device.get("copy_GB_per_s")
    matmul = (device.get("matmul") or {}).get("TFLOP_per_s")
    for bench in output_json.get("benchmarks", []):
        # pytest-benchmark writes parameters it cannot serialize as "UNSERIALIZABLE[torch.bfloat16]"; name dtypes.
        params = bench.get("params") or {}
        for key, value in params.items():
            if isinstance(value, torch.dtype):
                params[key] = str(value).removeprefix("torch.")
        extra = bench.setdefault("extra_info", {})
        if copy_bw and "GB_per_s" in extra:
            extra["GB_per_s_of_copy"] = extra["GB_per_s"] / copy_bw
        # Against the matmul peak of the same dtype only (an fp32 matmul's ceiling is not the bf16 one); the e2e
        # benchmark's MFU is this fraction already.
        dtype = str(params.get("dtype") or (bench.get("group") or "").rsplit("-", 1)[-1])
        same_dtype = dtype == (device.get("matmul") or {}).get("dtype")
        if matmul and same_dtype and "TFLOP_per_s" in extra and "MFU" not in extra:
            extra["TFLOP_per_s_of_matmul"] = extra["TFLOP_per_s"] / matmul


@pytest.fixture(autouse=True)
def _release_memory():
    """On CUDA, free what the previous benchmark left before the next one starts, and again after it.

    A finished contender's tensors can sit in reference cycles (closures over models and inputs, autograd graphs)
    until the garbage collector happens to run; they would count in the next contender's `max_memory_allocated`
    and shrink the memory it has. `empty_cache` returns the freed blocks so each contender starts from the same
    state. Without CUDA no memory is measured and the collection would only slow the CI smoke run.
    """
    if not torch.cuda.is_available():
        yield
        return
    gc.collect()
    torch.cuda.empty_cache()
    yield
    gc.collect()
    torch.cuda.empty_cache()

"""The all-reduce share of a DDP distillation step at BERT-base size, and the scaling efficiency it implies.

    python -m benchmarks.allreduce_share                       # measure compute here; predict for 8 NVLink GPUs
    python -m benchmarks.allreduce_share --batch 32 --seq 128 --grad-accum 4   # per-GPU micro-batch, accumulation

What is measured, on this machine: the step of `distill pretrain` at the DistilBERT recipe's sizes (a BERT-base
teacher, 12 × 768, run forward under no_grad; a 6-layer student trained with the triple loss on the LM-head-fused
kernel), split into forward (teacher + student + loss) and backward; and the exact DDP gradient buckets of that
student (`torch.distributed._compute_bucket_assignment_by_size`, DDP's own bucketing: 1 MB first bucket, 25 MB the
rest, in backward order).

What is modelled (assumptions, written down): buckets become ready in backward in proportion to the gradient bytes
produced so far (the tied word embedding, 94 MB of the 265 MB, is ready last: it also takes the first layer's
gradient); the all-reduces run one after another on NCCL's stream, each as soon as its bucket is ready and the
previous one is done, taking `latency + 2(W−1)/W · bytes / bus_bandwidth` (ring all-reduce); the exposed
communication is what runs past the end of backward. With accumulation (`--grad-accum k`) the gradients are reduced
once per optimizer step, in the last micro-batch's backward (`no_sync` on the others), so the step computes k
micro-batches and exposes one reduction. Efficiency = compute / (compute + exposed). The optimizer step,
the gloo stop flag (one int a step) and the log-time metric all-reduce are the same with and without DDP, or too
small to count, and are left out.

On a machine without a GPU the measured compute is the CPU's, which says nothing about a GPU: the prediction then
uses the step's FLOPs at an assumed model-FLOPs utilization (`--mfu`, DESIGN.md's target 0.5) of each GPU's bf16
peak, split into forward and backward as measured here (the fused loss forms the LM head's gradient in the forward,
so backward is the smaller part and hides less communication). On a GPU the measured time is used. One JSON line
per GPU kind is printed, then a table.
"""

import argparse
import json
import time

import torch

# Assumed NCCL all-reduce bus bandwidth of 8 GPUs on one NVLink node (large messages, nccl-tests' "busbw"), GB/s, and
# dense bf16/fp16 tensor-core peak, TFLOP/s. Round figures from the vendors' specifications and published
# nccl-tests runs; not measured here.
GPUS = {
    "V100 (DGX-1, NVLink 2)": {"bus_gb_s": 130.0, "peak_tflops": 125.0},
    "A100 (DGX A100, NVLink 3 + NVSwitch)": {"bus_gb_s": 230.0, "peak_tflops": 312.0},
    "H100 (DGX H100, NVLink 4 + NVSwitch)": {"bus_gb_s": 450.0, "peak_tflops": 989.0},
}
LATENCY_S = 20e-6  # per all-reduce call on one node (NCCL ring, small message), assumed
FIRST_BUCKET_BYTES = 1 << 20  # DDP's defaults
BUCKET_BYTES = 25 << 20


def build(device, dtype_teacher):
    from engine.config import ModelConfig
    from engine.model import MaskedLM

    teacher_cfg = ModelConfig.from_hf_dict(
        {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
         "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512}
    )  # fmt: skip
    student_cfg = ModelConfig.from_hf_dict(
        {"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12,
         "hidden_dim": 3072, "max_position_embeddings": 512}
    )  # fmt: skip
    teacher = MaskedLM(teacher_cfg).to(device, dtype_teacher).eval().requires_grad_(False)
    student = MaskedLM(student_cfg).to(device)
    return teacher, student


def measure_step(device, precision: str, batch: int, seq: int, iters: int) -> dict:
    """Forward and backward milliseconds of one micro-batch of the pretraining objective."""
    from engine.loop import autocast, compute_dtype
    from engine.objectives import PretrainObjective, device_batch
    from engine.options import MaskingOptions, ObjectiveOptions

    teacher, student = build(device, compute_dtype(precision) if device.type == "cuda" else torch.float32)
    student.train()
    for m in (teacher, student):
        m.encoder.validate_inputs = False
    gen = torch.Generator(device=device).manual_seed(0)
    special = torch.tensor([0, 100, 101, 102, 103], device=device)
    objective = PretrainObjective(teacher, student, ObjectiveOptions(), MaskingOptions(mlm_smoothing=0.0), special,
                                  103, None, gen)  # fmt: skip
    ids = torch.randint(1000, 30000, (batch, seq))
    ids[:, 0], ids[:, -1] = 101, 102
    attn = torch.ones_like(ids)
    b = device_batch(ids, attn, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fwd, bwd = [], []
    for i in range(iters + 2):  # two warm-up iterations
        sync()
        t0 = time.perf_counter()
        with autocast(device, precision):
            loss, _ = objective(b)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        student.zero_grad(set_to_none=True)
        if i >= 2:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    params = [p for p in student.parameters() if p.requires_grad]
    return {
        "fwd_ms": 1e3 * sorted(fwd)[len(fwd) // 2],
        "bwd_ms": 1e3 * sorted(bwd)[len(bwd) // 2],
        "params": params,
        "student": student,
        "teacher": teacher,
    }


def buckets(params) -> list[int]:
    """DDP's buckets of these parameters, in the order backward fills them: bytes each."""
    import torch.distributed as dist

    sizes = [BUCKET_BYTES] if not hasattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES") else [FIRST_BUCKET_BYTES, BUCKET_BYTES]
    indices, _ = dist._compute_bucket_assignment_by_size(params, sizes)
    nbytes = [sum(params[i].numel() * params[i].element_size() for i in bucket) for bucket in indices]
    return list(reversed(nbytes))  # DDP hands the reducer the buckets reversed: the last layers' first


def step_flops(student, teacher, tokens: int, seq: int) -> float:
    """Matmul FLOPs of one micro-batch: student forward + backward (3 × 2 per parameter and token), teacher forward
    (2 per parameter and token), both LM heads on every row (the KD rows), attention scores and values."""

    def body(m):  # parameters that multiply every token: all but the embedding tables (the tied decoder counted apart)
        e = m.encoder.embeddings
        tables = {id(p) for p in e.parameters()}
        return sum(p.numel() for p in m.parameters() if id(p) not in tables)

    v, h = student.config.vocab_size, student.config.hidden_size
    head = v * h
    s = 6 * (body(student) + head) * tokens + 3 * 4 * student.config.num_layers * seq * h * tokens
    t = 2 * (body(teacher) + head) * tokens + 4 * teacher.config.num_layers * seq * h * tokens
    return float(s + t)


def exposed_comm(bucket_bytes: list[int], bwd_s: float, world: int, bus_gb_s: float) -> tuple[float, float]:
    """(communication seconds in all, seconds of it past the end of backward), per the module docstring's model."""
    total = sum(bucket_bytes)
    done, end, comm = 0, 0.0, 0.0
    for b in bucket_bytes:
        done += b
        ready = bwd_s * done / total
        t = LATENCY_S + 2 * (world - 1) / world * b / (bus_gb_s * 1e9)
        end = max(ready, end) + t
        comm += t
    return comm, max(0.0, end - bwd_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="sequences per GPU micro-batch")
    parser.add_argument("--measure-batch", type=int, default=0, help="batch timed here (0: --batch on a GPU, 4 on CPU)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--world", type=int, default=8, help="GPUs on the node")
    parser.add_argument("--mfu", type=float, default=0.5, help="assumed model-FLOPs utilization without a GPU")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    batch = args.batch
    measured = args.measure_batch or (batch if cuda else 4)
    m = measure_step(device, precision, measured, args.seq, args.iters)
    scale = batch / measured  # compute is linear in the batch at these sizes
    m["fwd_ms"], m["bwd_ms"] = m["fwd_ms"] * scale, m["bwd_ms"] * scale
    bucket_bytes = buckets(m["params"])
    tokens = batch * args.seq
    flops = step_flops(m["student"], m["teacher"], tokens, args.seq)
    here = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision, "batch_per_gpu": batch, "measured_batch": measured, "seq": args.seq,
        "tokens_per_gpu": tokens, "grad_accum": args.grad_accum,
        "measured_fwd_ms_per_batch": round(m["fwd_ms"], 2), "measured_bwd_ms_per_batch": round(m["bwd_ms"], 2),
        "step_gflop": round(flops / 1e9, 1), "grad_mb": round(sum(bucket_bytes) / 2**20, 1),
        "buckets": len(bucket_bytes), "bucket_mb": [round(b / 2**20, 1) for b in bucket_bytes],
    }  # fmt: skip
    print(json.dumps(here))
    rows = []
    for name, gpu in GPUS.items():
        if cuda:  # the measured split (meaningful only for the GPU this runs on)
            fwd_s, bwd_s, source = m["fwd_ms"] / 1e3, m["bwd_ms"] / 1e3, "measured"
        else:
            compute = flops / (gpu["peak_tflops"] * 1e12 * args.mfu)
            share_bwd = m["bwd_ms"] / (m["fwd_ms"] + m["bwd_ms"])  # the measured split of the step
            fwd_s, bwd_s, source = compute * (1 - share_bwd), compute * share_bwd, f"FLOPs at MFU {args.mfu}"
        comm, exposed = exposed_comm(bucket_bytes, bwd_s, args.world, gpu["bus_gb_s"])
        compute = args.grad_accum * (fwd_s + bwd_s)  # per optimizer step; one reduction, in the last backward
        efficiency = compute / (compute + exposed)
        line = {"gpu": name, "compute_from": source, "compute_ms": round(1e3 * compute, 2),
                "bwd_ms": round(1e3 * bwd_s, 2), "allreduce_ms": round(1e3 * comm, 2),
                "exposed_ms": round(1e3 * exposed, 2), "allreduce_share_of_step": round(comm / compute, 3),
                "efficiency": round(efficiency, 3), "world": args.world, "bus_gb_s": gpu["bus_gb_s"]}  # fmt: skip
        rows.append(line)
        print(json.dumps(line))
    print()
    print(f"{'GPU':<40} {'compute ms':>10} {'all-reduce ms':>13} {'exposed ms':>10} {'efficiency':>10}")
    for r in rows:
        print(f"{r['gpu']:<40} {r['compute_ms']:>10} {r['allreduce_ms']:>13} {r['exposed_ms']:>10} "
              f"{100 * r['efficiency']:>9.1f}%")  # fmt: skip


if __name__ == "__main__":
    main()

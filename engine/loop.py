"""The hand-written mixed-precision training loop that every command shares, and its checkpoints.

`train()` runs in nanoGPT's order: autocast context; loss ÷ accumulation steps (× the loss scale
for fp16); backward; then one guarded optimizer step (unscale → clip → overflow check → step →
scale update → zero_grad(set_to_none)) and the learning rate from the pure `lr_at(step)`. A step
reads nothing back to the host: loss terms are summed into device tensors and read only every
`log_every` steps, when a metrics line is written.

A checkpoint (torchtitan's Stateful idea) is one directory, replaced atomically, holding:
    model/              the trained model in Hugging Face layout (loadable by `transformers`)
    trainer_state.pt    optimizer, scaler, step guard, step, RNG states, data position, extras
so a crash or Ctrl-C during a save leaves the previous checkpoint whole. SIGINT and SIGTERM finish
the step in flight, save, and return. A resume first completes a replacement that a crash cut between its two renames
(`engine.atomic.finish_interrupted_swaps`) and cuts `metrics.jsonl` back to the checkpoint's step, so the steps
redone after a crash are not logged twice.
"""

import contextlib
import functools
import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from engine import distributed
from engine.atomic import atomic_write, explain_write_errors, finish_interrupted_swaps, tensor_bytes
from engine.checkpoint import atomic_directory, load_state_into, save_model
from engine.options import PRECISIONS, OptimOptions, RunOptions
from engine.scaler import DynamicLossScaler, StepGuard, lr_at


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 on CUDA devices that support it, fp32 elsewhere (CPU bf16 matmuls are slow on
    most CPUs and the CPU path exists for correctness and the bundled demo, not speed)."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 needs CUDA (CPU autocast has no fp16 matmuls); use bf16 or fp32")
    return name


def compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=compute_dtype(precision), enabled=precision != "fp32")


def make_optimizer(params, opts: OptimOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters, and the device-side overflow skip) where supported."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    kwargs = dict(lr=opts.lr, betas=tuple(opts.betas), eps=opts.eps, weight_decay=opts.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused unsupported for this device or dtype
        return torch.optim.AdamW(params, **kwargs)


class Stateful(Protocol):
    """Anything with state_dict()/load_state_dict() (data position, masking generator, …)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GeneratorState:
    """A torch.Generator as a checkpointable thing."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second signal is not
    swallowed: the default handler comes back after the first).

    Under torchrun (`keep=True`) every signal is swallowed: a scheduler's SIGTERM reaches a worker twice, once from
    the scheduler and once forwarded by torchrun, and the second must not kill it mid-save. torchrun's own
    `--shutdown-timeout` (30 s by default, then SIGKILL) is the way out of a worker that does not stop.
    """

    def __init__(self, keep: bool = False):
        self.signal: int | None = None
        self.keep = keep
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, nothing to restore
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        if not self.keep:
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    interrupted: bool  # stopped early by a signal (checkpoint saved)
    history: list = field(default_factory=list)  # the metric lines written this run
    seconds: float = 0.0
    sharded: bool = False  # FSDP2 sharded the model (and teacher) in place: read the final checkpoint back to use them


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_rng(state: dict, seed: int) -> dict:
    """This rank's RNG state from a checkpoint. Data order and masking are global (the data position and the masking
    generator are the same on every rank), so a run may resume on another world size; only the ranks' dropout streams
    cannot carry over: a rank the checkpoint did not have starts its own from (seed, rank, step)."""
    ranks = state.get("rng_ranks") or [state["rng"]]
    r, saved_w = distributed.rank(), state.get("world_size", 1)
    if saved_w != distributed.world_size():
        print(
            f"resuming a {saved_w}-process checkpoint on {distributed.world_size()} processes: the data order and "
            "the masks continue exactly; dropout draws do not (they are per rank)"
        )
    if r < len(ranks):
        return ranks[r]
    torch.manual_seed(distributed.rank_seed(seed + state["step"], r))
    return _rng_state()


def _sum_over_ranks(sums: dict[str, torch.Tensor]) -> None:
    """Sum every rank's share of each logged mean, in place (one all-reduce; nothing to do for one process)."""
    if distributed.world_size() == 1 or not sums:
        return
    stacked = distributed.all_reduce_sum(torch.stack([v.float() for v in sums.values()]))
    for k, v in zip(list(sums), stacked):
        sums[k] = v


def save_checkpoint(path: Path, model, tokenizer_dir, trainer_state: dict, model_state: dict | None = None) -> None:
    """Write model + trainer state into `path` atomically (the old checkpoint survives any failure); a full disk is
    one OSError that says how much space a checkpoint needs. `model_state`: the weights of a sharded model, gathered
    (`DataParallel.full_state`); None: the model's own."""

    def needed() -> int:  # the new checkpoint is written beside the old one
        weights = model_state if model_state is not None else model.state_dict()
        return tensor_bytes(weights) + tensor_bytes(trainer_state)

    with explain_write_errors(path, "the checkpoint", needed), atomic_directory(path) as tmp:
        save_model(model, Path(tmp) / "model", tokenizer_dir=tokenizer_dir, state=model_state)
        with open(Path(tmp) / "trainer_state.pt", "wb") as f:  # closed on a failed write too (torch leaks its fd)
            torch.save(trainer_state, f)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep the metric lines up to `step` (a checkpoint's); a crash after a line but before its checkpoint would
    otherwise log the redone steps twice, and a kill mid-write leaves a partial last line. Returns lines dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for text in path.read_text().splitlines():
        try:
            keep = json.loads(text)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(text)
        else:
            dropped += 1
    if dropped:
        data = "".join(line + "\n" for line in kept).encode()
        atomic_write(path, lambda f: f.write(data))
    return dropped


def load_trainer_state(path: Path) -> dict:
    f = Path(path) / "trainer_state.pt"
    if not f.is_file():
        raise FileNotFoundError(f"no checkpoint to resume in {path}: {f.name} is missing; start without --resume")
    return torch.load(f, map_location="cpu", weights_only=False)


def train(
    model: torch.nn.Module,
    step_loss: Callable[[object], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    batches,
    optim: OptimOptions,
    run: RunOptions,
    out_dir: Path,
    device: torch.device,
    precision: str,
    tokenizer_dir=None,
    stateful: dict[str, Stateful] | None = None,
    evaluate: Callable[[int], dict] | None = None,
    tokens_in: Callable[[object], torch.Tensor] | None = None,
    options_record: dict | None = None,
    on_save: Callable[[int], None] | None = None,
    teacher: torch.nn.Module | None = None,
) -> TrainResult:
    """Train `model` for `optim.steps` optimizer steps.

    Args:
        step_loss: batch → (loss, {term name: 0-dim tensor}) for one micro-batch; called under autocast.
        batches: has `next_batch()` and `state_dict()`/`load_state_dict()` (the data position).
        stateful: more things to checkpoint by name (e.g. the masking generator).
        evaluate: step → metrics dict, under no_grad; run every `run.eval_every` steps and at the end.
        tokens_in: batch → number of real tokens (a device tensor), for tokens/s.
        on_save: called with the step after each checkpoint is saved.
        teacher: the frozen model that `step_loss` runs, sharded with the student under `run.fsdp`. Sharding is in
            place: afterwards `model` and `teacher` hold shards (the caller reads the final checkpoint back).
    Returns:
        TrainResult; metric lines also go to `out_dir/metrics.jsonl`, checkpoints to `out_dir/checkpoint`.
    """
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoint"
    stateful = dict(stateful or {})
    warmup = int(math.ceil(optim.warmup * optim.steps))
    start, state = 0, None
    if run.resume:
        distributed.run_on_main(lambda: finish_interrupted_swaps(out_dir))
        state = load_trainer_state(ckpt_dir)
        if state["step"] > optim.steps:
            raise ValueError(
                f"--steps {optim.steps}: the checkpoint in {ckpt_dir} is at step {state['step']} already; "
                f"give --steps {state['step']} or more to continue it"
            )
        load_state_into(model, ckpt_dir / "model")  # whole weights, before any sharding cuts them
    # Under torchrun the student is replicated by DDP (its gradients all-reduced in backward), or sharded with the
    # teacher by FSDP2 (--fsdp); alone it is itself. The optimizer is made after: on the shards, when sharded.
    parallel = distributed.DataParallel(model, step_loss, device, fsdp=run.fsdp, teacher=teacher)
    optimizer = make_optimizer(model.parameters(), optim, device)
    scaler = DynamicLossScaler(device) if precision == "fp16" else None
    guard = StepGuard(optimizer, scaler, optim.clip)
    if state is not None:
        parallel.load_optimizer_state(optimizer, state["optimizer"])
        guard.load_state_dict(state["guard"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])
        for name, obj in stateful.items():
            obj.load_state_dict(state["extra"][name])
        _set_rng_state(_rank_rng(state, run.seed))
        start = state["step"]
    else:
        distributed.seed_ranks(run.seed)

    def checkpoint(step: int) -> None:
        # Sharded, every rank joins the gathers of the whole weights and moments (rank 0 keeps them): a checkpoint
        # is the same files whatever ran it (1 process, DDP, FSDP2), loadable by transformers and resumable by each.
        model_state, optimizer_state = parallel.full_state(model, optimizer)
        trainer_state = {
            "step": step,
            "optimizer": optimizer_state,
            "guard": guard.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "data": batches.state_dict(),
            "extra": {name: obj.state_dict() for name, obj in stateful.items()},
            "rng": _rng_state(),
            "rng_ranks": distributed.gather_objects(_rng_state()),  # every rank's dropout stream
            "world_size": distributed.world_size(),
            "options": options_record,
        }
        # Rank 0 writes (the model and optimizer are the same on every rank); all wait until the checkpoint is whole.
        distributed.run_on_main(
            lambda: save_checkpoint(ckpt_dir, model, tokenizer_dir, trainer_state, model_state), share_result=False
        )
        if on_save is not None:
            on_save(step)

    main = distributed.is_main()  # rank 0 alone writes the log and shows progress
    if run.resume and main:
        truncate_metrics(out_dir / "metrics.jsonl", start)
    # A fresh start begins a fresh log; a resumed one continues it.
    metrics_file = open(out_dir / "metrics.jsonl", "a" if run.resume else "w") if main else None  # noqa: SIM115
    history = []
    progress = None
    if run.progress and main:
        from tqdm.auto import tqdm

        progress = tqdm(total=optim.steps, initial=start, unit="step", dynamic_ncols=True)
    sums: dict[str, torch.Tensor] = {}
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    t_last, step_last = time.perf_counter(), start
    t0 = time.perf_counter()
    step = start
    interrupted = False
    model.train()
    try:
        with StopRequest(keep=distributed.launched()) as stop:
            while step < optim.steps:
                lr = lr_at(step, optim.steps, warmup, optim.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(optim.grad_accum):
                    batch = batches.next_batch()  # the global batch; the objective keeps this rank's rows
                    # Gradients are all-reduced once per optimizer step: in the last micro-batch's backward.
                    sync = micro == optim.grad_accum - 1
                    with contextlib.nullcontext() if sync else parallel.no_sync():
                        with autocast(device, precision):
                            loss, terms = parallel(batch)
                        scaled = scaler.scale_loss(loss) if scaler is not None else loss
                        if distributed.grad_sum_factor() != 1:
                            scaled = scaled * distributed.grad_sum_factor()  # DDP's mean over ranks → sum of shares
                        (scaled / optim.grad_accum).backward()
                    for k, v in {"loss": loss, **terms}.items():
                        v = v.detach().float() / optim.grad_accum
                        sums[k] = sums[k] + v if k in sums else v
                    if tokens_in is not None:
                        tokens += tokens_in(batch)
                guard.step()
                step += 1
                if progress is not None:
                    progress.update(1)
                stopping = distributed.agree_to_stop(stop.signal is not None)  # every rank stops at this step
                last = step == optim.steps or stopping
                if step % max(run.log_every, 1) == 0 or last:
                    # The only host reads of training: once per log interval. Each rank holds its share of every
                    # global mean; one all-reduce sums them (tokens are counted from the global batch already).
                    _sum_over_ranks(sums)
                    now = time.perf_counter()
                    n = step - step_last
                    line = {"step": step, "lr": lr}
                    line.update({k: round(float(v) / n, 6) for k, v in sums.items()})
                    line["grad_norm"] = round(float(guard.last_grad_norm), 4)
                    line["skipped_steps"] = int(guard.skipped)
                    if scaler is not None:
                        line["loss_scale"] = float(scaler.scale)
                    if tokens_in is not None:
                        line["tokens_per_s"] = round(float(tokens) / max(now - t_last, 1e-9), 1)
                    line["elapsed_s"] = round(now - t0, 2)
                    sums, tokens = {}, torch.zeros_like(tokens)
                    t_last, step_last = now, step
                    history.append(line)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(line) + "\n")
                        metrics_file.flush()
                    if progress is not None:
                        progress.set_postfix(loss=line["loss"], tok_s=line.get("tokens_per_s", ""))
                # Rank 0 evaluates alone, unless the models are sharded: then every rank takes part in the gathers.
                evaluating = main or parallel.sharded
                if evaluate is not None and run.eval_every and step % run.eval_every == 0 and not last and evaluating:
                    record = {"step": step, "eval": parallel.gathered(functools.partial(evaluate, step))}
                    model.train()
                    if main:
                        history.append(record)
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                if stopping:
                    interrupted = True
                    checkpoint(step)
                    break
                if (run.save_every and step % run.save_every == 0) or last:
                    checkpoint(step)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - t0
    return TrainResult(step=step, interrupted=interrupted, history=history, seconds=seconds, sharded=parallel.sharded)

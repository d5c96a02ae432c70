"""The process group: the one module that knows how many processes train and which one this is.

Launched by `torchrun` (one process per device; multi-node through torchrun's rendezvous), every command runs the
same code on every rank; launched without it, the same code runs with world size 1 and no process group at all.
Everything a command needs from `torch.distributed` goes through here (torchtitan's `dist_utils` idea):

    init(device)            the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK);
                            gloo on CPU, NCCL for CUDA tensors (with gloo beside it for CPU tensors), and a gloo
                            group with an hours-long timeout for objects and for waiting on rank 0;
                            the rank's device (cuda:LOCAL_RANK)
    world_size, rank, is_main, shard       who am I
    barrier, all_reduce_sum, agree_to_stop, gather_objects   the collectives the engine uses
    run_on_main, main_first                file work done once: rank 0 writes, the others wait (errors reach all)
    DataParallel                           the student under DDP, or sharded with the teacher by FSDP2 (`--fsdp`),
                                           with `no_sync` for accumulation and whole states for checkpoints

How W ranks train exactly as 1 rank (DESIGN.md, "Many devices"):
  * data: every rank draws the same *global* batch (`--batch-size` is the global micro-batch) and keeps its rows
    `Shard.rows` = [r·B/W, (r+1)·B/W); the union is the 1-rank batch;
  * loss: every term is a mean over the global batch's rows; a rank's loss is its local mean × its share of those
    rows (`engine.objectives`), so the W losses sum to the 1-rank loss and the gradients sum to its gradient.
    DDP averages gradients over ranks, so the loop multiplies the loss by W before backward (`grad_sum_factor`);
  * metrics: the per-rank loss shares are summed across ranks once per log interval, never per step.
Rank 0 alone writes files (metrics, checkpoints, reports, caches) and prints; the others' stdout goes to /dev/null.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import inspect
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_device: torch.device | None = None  # the rank's device once `init` ran
_cpu_group = None  # gloo, with a long timeout: small objects, and the waits for rank 0's file work
WAIT_TIMEOUT = datetime.timedelta(hours=6)  # how long the other ranks wait for rank 0 (e.g. tokenizing a corpus)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE), whatever the world size."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def world_size() -> int:
    """Processes in the run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in [0, world_size) (0 without torchrun); known from torchrun's environment already before
    `init`, so that code running before a command's setup (its run-folder lock) knows it is not rank 0."""
    if dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0) if launched() else 0


def local_rank() -> int:
    """This process's index on its node: the CUDA device it drives."""
    return _env_int("LOCAL_RANK", 0) if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


@dataclass(frozen=True)
class Shard:
    """Which rows of every global batch a rank keeps: the r-th of W near-equal contiguous slices.

    A global batch of B rows gives rank r the rows [⌊r·B/W⌋, ⌊(r+1)·B/W⌋); with B divisible by W (checked once by
    `check_batch_size`) every slice has B/W rows. A batch with fewer rows than ranks (an epoch's last, short batch)
    leaves some ranks without a row: they compute on row 0 with weight 0 (`share` 0), so every rank still runs the
    same collectives and no kernel sees an empty input.
    """

    rank: int = 0
    world: int = 1

    def rows(self, n: int) -> tuple[slice, bool]:
        """(slice of this rank's rows among `n`, whether they are real; False: a stand-in row 0 of weight 0)."""
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return (slice(lo, hi), True) if hi > lo else (slice(0, min(1, n)), False)


def shard() -> Shard:
    return Shard(rank(), world_size())


def check_batch_size(batch_size: int, flag: str = "--batch-size") -> None:
    """The global batch must split evenly across the ranks; a clear error names the flag and the nearest fits."""
    w = world_size()
    if batch_size % w:
        lo, hi = batch_size // w * w, -(-batch_size // w) * w
        raise ValueError(
            f"{flag} {batch_size} is the global batch and must be divisible by the {w} processes so that each takes "
            f"the same number of rows; use {lo or w} or {hi}"
        )


def init(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes, once per process, and return this rank's device.

    Without torchrun (or with one process) nothing is initialized and `device` comes back unchanged. A CUDA device
    becomes cuda:LOCAL_RANK (one device per process); the group then runs NCCL for CUDA tensors and gloo for CPU
    tensors (the per-step stop flag and small objects), which `torch.distributed` routes by the tensor's device.
    """
    global _device
    if dist.is_initialized():
        return _device if _device is not None else device
    if not launched() or _env_int("WORLD_SIZE", 1) == 1:
        _device = device
        return device
    if device.type == "cuda":
        device = torch.device("cuda", _env_int("LOCAL_RANK", 0))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device}: multi-process runs support cuda and cpu")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, **kwargs)
    atexit.register(shutdown)
    global _cpu_group
    # Rank 0 alone tokenizes a corpus or writes a checkpoint while the others wait in a broadcast: on a group of
    # their own, whose timeout is hours, not NCCL's minutes (the default group's watchdog stays as it is).
    _cpu_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    _device = device
    if not is_main():
        # One voice: rank 0 prints progress and results; errors (stderr) still come from every rank.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that died first leaves nothing to agree on
            dist.destroy_process_group()


# ---- collectives ----------------------------------------------------------------------------------------------------


def barrier() -> None:
    if world_size() > 1:
        dist.barrier(group=_cpu_group)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (and return it); a no-op with one process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_to_stop(flag: bool) -> bool:
    """True on every rank when any rank asks to stop: called by every rank at the same step boundary, it makes the
    ranks stop at the same step (a signal reaches them at different moments). One int over gloo per step (tens of
    microseconds on a node; no device sync)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_cpu_group)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_cpu_group)
    return box[0]


def _raise_on_all(error: BaseException | None) -> None:
    """Share rank 0's outcome: when it failed, every rank raises the same error (a clear message on rank 0 and no
    rank left waiting in a collective). The exception itself travels when it pickles; else its type and message."""
    shared = None
    if error is not None:
        try:
            shared = ("error", pickle.loads(pickle.dumps(error)))
        except Exception:  # an exception that does not survive pickling: its type and message
            shared = ("text", type(error), str(error))
    shared = broadcast_object(shared)
    if error is not None:
        raise error
    if shared is None:
        return
    if shared[0] == "error":
        raise shared[1]
    _, kind, message = shared
    try:
        raise kind(message)
    except TypeError:  # a constructor that wants more than a message
        raise RuntimeError(message) from None


def run_on_main(fn: Callable[[], T], share_result: bool = True) -> T | None:
    """`fn()` on rank 0 alone (a file write, a report); its result (when `share_result`) reaches every rank, and its
    exception is raised on every rank."""
    if world_size() == 1:
        return fn()
    result = _main_only(fn)
    return broadcast_object(result) if share_result else result


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 first, then on the others: for work that leaves a cache behind (tokenization, a bundled
    model), which rank 0 builds and the others then read."""
    if world_size() == 1:
        return fn()
    result = _main_only(fn)
    return result if is_main() else fn()


def _main_only(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 alone, its exception raised on every rank: rank 0's result there, None on the others."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            error = e
    _raise_on_all(error)
    return result


def rank_seed(seed: int, r: int) -> int:
    """The global-RNG seed of rank r > 0 (dropout): a hash of (seed, rank), so ranks draw independent streams.
    Rank 0 keeps the run's own stream, so a 1-process run is unchanged."""
    digest = hashlib.sha256(f"rank/{seed}/{r}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_ranks(seed: int) -> None:
    """Give every rank but 0 its own global RNG stream (models are built before this, from the common seed)."""
    if rank() > 0:
        torch.manual_seed(rank_seed(seed, rank()))


# ---- the student across ranks ---------------------------------------------------------------------------------------


class _Step(torch.nn.Module):
    """The student with the micro-batch loss as its forward, so that DDP (or FSDP2) sees the whole step: the loss
    uses the student's parameters outside `student.forward` (the fused LM head takes the decoder weight itself).

    Under FSDP2 this module is the root: its forward all-gathers the student's embeddings and head (the root group),
    which stay gathered until backward has used them (FSDP2 does not reshard a root after forward), so the fused head
    reads a whole decoder weight. A sharded teacher is a submodule here (so that the root's lazy init knows its
    groups); its embeddings and head are gathered explicitly around the step, as nothing calls the teacher's own
    forward (the objective calls `teacher.encoder` and reads `teacher.lm_head` itself).
    """

    def __init__(self, student: torch.nn.Module, step_loss: Callable, teacher: torch.nn.Module | None = None):
        super().__init__()
        self.student = student
        self._step_loss = [step_loss]  # in a list: not a submodule (the frozen teacher it may close over stays out)
        if teacher is not None:  # FSDP2 alone: a sharded teacher must sit under the root
            self.teacher = teacher

    def forward(self, batch, fn: Callable | None = None):
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.unshard()  # its layers gather themselves in their own forwards
        try:
            return (fn or self._step_loss[0])(batch)
        finally:
            if teacher is not None:
                teacher.reshard()  # nothing of the teacher is needed in backward (its outputs carry no grad)


def _local_share(model: torch.nn.Module) -> float:
    """The fraction of `model`'s parameter elements this rank holds (1/W when every parameter is sharded)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return local / max(1, sum(p.numel() for p in params))


def _shard_layers(model: torch.nn.Module, mesh) -> None:
    """One FSDP2 group per transformer layer of a BERT/DistilBERT model (all-gathered for its forward and again for
    its backward, freed after each); the rest (embeddings, head) is left to the group of an enclosing module."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.encoder.layers:
        fully_shard(layer, mesh=mesh)


class DataParallel:
    """The micro-batch loss of a student replicated by DDP on every rank (world size > 1), sharded by FSDP2
    (`fsdp`), or the plain loss (1 process, with or without `fsdp`: there is nothing to shard over).

    DDP buckets the gradients (25 MB) and all-reduces each bucket as soon as backward has filled it, overlapped with
    the rest of backward; `no_sync()` skips the all-reduce on all but the last micro-batch of an accumulation. The
    frozen teacher is not wrapped: each rank holds a replica and runs it under no_grad.

    FSDP2 (`torch.distributed.fsdp.fully_shard`, where a model does not fit one device): every rank holds 1/W of
    each parameter, gradient and optimizer moment (DTensors sharded on dim 0); each transformer layer is all-gathered
    for its forward and again for its backward, and its gradient is reduce-scattered (averaged, as DDP's all-reduce,
    hence the same `grad_sum_factor`); the student's embeddings and head form the root group (`_Step`). The frozen
    `teacher` is sharded the same way, layer by layer plus one group for its embeddings and head, and never gets
    gradients. Sharded, `no_sync()` does nothing: every micro-batch's gradient is reduce-scattered and the shards
    accumulate, so no rank ever holds a whole gradient (FSDP2's `set_requires_gradient_sync(False)` would keep
    whole fp32 gradients between micro-batches, the memory `--fsdp` is there to save; one reduce-scatter per
    micro-batch is the price). Backward prefetches the student's previous layer explicitly: FSDP2's default replays
    the forward order, in which the teacher's layers ran first, and would all-gather a teacher layer for nothing.
    Parameters are sharded in place: the student and teacher the caller holds are the sharded ones, readable only
    through `gathered` (every rank at once) and `full_state` until the run ends.

    Call: batch → (loss, terms), as the `step_loss` it wraps.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        step_loss: Callable,
        device: torch.device,
        fsdp: bool = False,
        teacher: torch.nn.Module | None = None,
    ):
        self.step_loss = step_loss
        self.ddp = None
        self.fsdp = None  # the FSDP2 root (`_Step`) when sharded
        if fsdp and world_size() == 1:
            print("--fsdp: one process, nothing to shard over; training unsharded (shard under torchrun, 2+ ranks)")
        if world_size() == 1 or not any(p.requires_grad for p in student.parameters()):
            return
        if fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world_size(),))
            if teacher is not None:
                _shard_layers(teacher, mesh)
                fully_shard(teacher, mesh=mesh)  # embeddings + head: one group, gathered by `_Step.forward`
            _shard_layers(student, mesh)
            self.fsdp = fully_shard(_Step(student, step_loss, teacher), mesh=mesh)
            layers = list(student.encoder.layers)
            for i, layer in enumerate(layers):  # the first layer "prefetches" the root, which is already whole
                layer.set_modules_to_backward_prefetch([layers[i - 1] if i else self.fsdp])
            models = [("student", student)] + ([("teacher", teacher)] if teacher is not None else [])
            held = ", ".join(f"{100 * _local_share(m):.1f}% of the {name}'s parameters" for name, m in models)
            print(f"FSDP2: sharded over {world_size()} ranks; rank 0 holds {held}")
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [device] if device.type == "cuda" else None
        # The model's buffers are constants (position ids): nothing to broadcast before each forward. Gradients
        # live in the all-reduce buckets themselves (no copy in and out, one gradient's memory less).
        params = inspect.signature(DistributedDataParallel).parameters
        flag = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"  # torch ≥ 2.13
        no_buffer_sync = {flag: False}
        self.ddp = DistributedDataParallel(
            _Step(student, step_loss), device_ids=ids, gradient_as_bucket_view=True, **no_buffer_sync
        )

    def __call__(self, batch):
        if self.fsdp is not None:
            return self.fsdp(batch)
        return self.ddp(batch) if self.ddp is not None else self.step_loss(batch)

    @property
    def sharded(self) -> bool:
        """FSDP2: the parameters are shards, so any use of the models is a collective that every rank joins."""
        return self.fsdp is not None

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """DDP: gradients of the micro-batches run inside accumulate on this rank, unreduced (not the last one).
        Sharded or alone: nothing (FSDP2 reduce-scatters every micro-batch; see the class docstring)."""
        if self.ddp is not None:
            with self.ddp.no_sync():
                yield
        else:
            yield

    def gathered(self, fn: Callable[[], T]) -> T:
        """`fn()` with the student's and teacher's parameters whole (evaluation): sharded, it runs inside the root's
        forward, where FSDP2 all-gathers each group as in training, so every rank must call it; else just `fn()`."""
        if self.fsdp is None:
            return fn()
        return self.fsdp(None, fn=lambda _: fn())

    def full_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict]:
        """(model state, optimizer state) whole, for a checkpoint in the 1-process format (every rank calls it).

        Sharded: the model's full state dict (our parameter names, on the CPU) on rank 0 and {} elsewhere, and the
        optimizer's `state_dict()` with every DTensor moment gathered (rank 0 keeps it, on the CPU; other ranks
        keep None). Replicated or alone: (None: read the model itself, `optimizer.state_dict()`).
        """
        if self.fsdp is None:
            return None, optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        state = optimizer.state_dict()  # ids in param_groups order, as a 1-process run writes them
        state["state"] = {i: dict(per_param) for i, per_param in state["state"].items()}  # not the live dicts
        for per_param in state["state"].values():
            for key, value in per_param.items():  # the same order on every rank: the gathers pair up
                if isinstance(value, DTensor):
                    whole = value.full_tensor()
                    per_param[key] = whole.cpu() if is_main() else None
        return model_state, state

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a whole (1-process format) optimizer state; sharded, every rank keeps its slice of each moment."""
        if self.fsdp is not None:
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {**state, "state": dict(state["state"])}
            for i, per_param in state["state"].items():
                p = params[i]
                if not isinstance(p, DTensor):
                    continue
                state["state"][i] = {
                    k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(v, torch.Tensor) and v.shape == p.shape
                    else v
                    for k, v in per_param.items()
                }  # every rank read the whole state: each cuts its own slice (src_data_rank=None: no communication)
        optimizer.load_state_dict(state)


def grad_sum_factor() -> int:
    """What a rank's loss is multiplied by before backward: DDP (and FSDP2) average gradients over the W ranks, and
    the ranks' losses are shares that sum to the global loss, so ×W turns that average into the sum (exact for W a
    power of 2)."""
    return world_size()


@contextlib.contextmanager
def silenced_unless_main() -> Iterator[None]:
    """Run a block with stdout muted on ranks other than 0 (already the case after `init`; for library calls that
    print before it)."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield

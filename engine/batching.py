"""Batching: padded, resumable batches for every command, and the one way a batch reaches the device.

- `LengthGroupedBatches`: pretraining sequences grouped by length (little padding), deterministic from
  (seed, epoch), resumable mid-epoch.
- `EpochBatches`: any per-epoch batch iterator (task data) made endless and resumable.
- `epoch_seed(seed, epoch)`: the one seeding scheme of every epoch's order.
- `pad_to_multiple`: right-padding to a multiple of 8 (tensor-core tiles).
- `to_device`: a CPU batch on the device, pinned and non-blocking on CUDA.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace

import torch

from engine.corpus import Sequences, as_sequences


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s order in a run seeded `seed`: a hash, not seed + epoch, so that
    (seed 0, epoch 1) and (seed 1, epoch 0) differ."""
    # The prefix predates EpochBatches: kept so that earlier pretraining runs resume and reproduce exactly.
    digest = hashlib.sha256(f"LengthGroupedBatches/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def to_device(batch, device: torch.device):
    """A CPU batch (a dict of tensors or a dataclass of tensors) on `device`; on CUDA the host tensors are pinned
    and copied non-blocking, so the copy overlaps the previous step's work."""
    nb = torch.device(device).type == "cuda"

    def move(t):
        return (t.pin_memory() if nb else t).to(device, non_blocking=nb) if isinstance(t, torch.Tensor) else t

    if is_dataclass(batch):
        return replace(batch, **{f.name: move(getattr(batch, f.name)) for f in fields(batch)})
    return {k: move(v) for k, v in batch.items()}


def pad_to_multiple(
    sequences: Sequence[Sequence[int]], pad_value: int, multiple_of: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences to the batch's longest length rounded up to a multiple of `multiple_of`.

    Multiples of 8 keep bf16/fp16 matmul shapes on tensor-core tiles.

    Args:
        sequences: B lists of ints (lengths may differ).
        pad_value: value written into padding positions.
        multiple_of: padded length granularity.

    Returns:
        (values, mask): int64 (B, L) padded values and int64 (B, L) mask, 1 at real positions and 0 at
        padding, with L = ceil(max length / multiple_of) · multiple_of.
    """
    longest = max((len(s) for s in sequences), default=0)
    length = max(-(-longest // multiple_of) * multiple_of, multiple_of)
    values = torch.full((len(sequences), length), pad_value, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, L)
    for row, seq in enumerate(sequences):
        values[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return values, mask


@dataclass
class Batch:
    """A padded batch.

    Attributes:
        input_ids: (B, L) int64, padded with the pad id; L is a multiple of `pad_to_multiple`.
        attention_mask: (B, L) int64, 1 for real tokens ([CLS] and [SEP] included), 0 for padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return Batch(self.input_ids.pin_memory(), self.attention_mask.pin_memory())


class LengthGroupedBatches:
    """Length-grouped, padded batches; deterministic from (seed, epoch) and resumable mid-epoch.

    An epoch's plan: shuffle all sequences; cut the shuffled order into mega-buckets of
    `bucket_batches × batch_size` sequences; sort each bucket by length (longest first); cut it
    into batches (`batch_size` sequences, fewer where `max_tokens` says so); shuffle the order of
    all the epoch's batches. Sequences in a batch have similar lengths, so padding is small, while
    the shuffles keep batches and their order random. Every sequence appears exactly once an epoch
    (the last batch of a bucket may be smaller).

    Two ways to consume it:
      * step-based (the training loop): `next_batch()` returns the next batch and rolls into the
        next epoch when one ends, forever;
      * epoch-based: `for batch in loader` yields the rest of the current epoch, then advances the
        epoch counter (a loop broken off early stays in its epoch).
    Both advance the same position, so `state_dict()` taken after any batch, given to
    `load_state_dict()` of a loader built on the same sequences and arguments, resumes with
    exactly the batches that would have followed.

    `shuffle=False` keeps the input order (buckets by position, no batch shuffle): for evaluation.
    """

    def __init__(
        self,
        sequences: Sequences | Sequence[Sequence[int]],
        batch_size: int,
        pad_id: int,
        *,
        max_tokens: int | None = None,
        seed: int = 0,
        bucket_batches: int = 100,
        pad_to_multiple: int = 8,
        shuffle: bool = True,
        pin_memory: bool = False,
        indices: torch.Tensor | None = None,
    ):
        """
        Args:
            sequences: N sequences (`Sequences` or lists of ids), N ≥ 1.
            batch_size: the most sequences in a batch.
            pad_id: the id written into padding.
            max_tokens: if given, also cap a batch's padded size B × L at this many tokens (a
                sequence longer than the budget still gets a batch of its own).
            seed: the shuffling seed; epoch e's plan depends only on (seed, e).
            bucket_batches: batches per mega-bucket; larger groups lengths tighter, smaller keeps
                more randomness in which sequences share a batch.
            pad_to_multiple: L is rounded up to a multiple of this (8 suits tensor cores).
            shuffle: False gives a fixed, unshuffled order (evaluation).
            pin_memory: return batches in pinned host memory (for non_blocking copies to CUDA).
            indices: (M,) int64, batch only these sequences, in this order (a split that shares a memory-mapped
                token store instead of copying it, `engine.corpus.split_indices`); the same batches as
                `sequences.subset(indices)` gives.
        """
        self.seqs = as_sequences(sequences)
        self.index = None if indices is None else torch.as_tensor(indices, dtype=torch.int64)
        if self._count() == 0:
            raise ValueError("no sequences to batch (empty corpus, or all sequences dropped as too short?)")
        if batch_size < 1 or bucket_batches < 1 or pad_to_multiple < 1:
            raise ValueError("batch_size, bucket_batches and pad_to_multiple must be ≥ 1")
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.seed = seed
        self.bucket_batches = bucket_batches
        self.pad_to_multiple = pad_to_multiple
        self.shuffle = shuffle
        self.pin_memory = pin_memory
        self.epoch = 0  # the epoch being consumed
        self.position = 0  # batches of `epoch` already handed out
        self._lengths = self.seqs.lengths if self.index is None else self.seqs.lengths[self.index]  # (M,) by position
        self._plan_cache: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- the plan ------------------------------------------------------------------------------

    def _count(self) -> int:
        """Sequences batched: all of `sequences`, or those of `indices`."""
        return len(self.seqs) if self.index is None else self.index.numel()

    def _padded(self, n: int) -> int:
        m = self.pad_to_multiple
        return -(-n // m) * m

    def _plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order (N,) int64, starts (nb,) int64, ends (nb,) int64): batch k is order[starts[k]:ends[k]]."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1:]
        n = self._count()
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        bucket = self.bucket_batches * self.batch_size
        bucket_id = torch.arange(n) // bucket
        lengths = self._lengths[order]
        # One stable sort on (bucket, -length) sorts every bucket by length, longest first.
        key = bucket_id * (int(lengths.max()) + 1) + (int(lengths.max()) - lengths)
        order = order[torch.sort(key, stable=True).indices]
        if self.max_tokens is None:
            # Buckets hold a whole number of batches, so fixed-size cuts never straddle two.
            starts = torch.arange(0, n, self.batch_size)
            ends = (starts + self.batch_size).clamp_max(n)
        else:
            starts_l, ends_l = [], []
            sorted_len = self._lengths[order].tolist()
            for b0 in range(0, n, bucket):
                b1 = min(b0 + bucket, n)
                i = b0
                while i < b1:
                    # Longest first: the batch's first sequence sets its padded length.
                    fit = max(1, self.max_tokens // self._padded(sorted_len[i]))
                    j = min(i + min(fit, self.batch_size), b1)
                    starts_l.append(i)
                    ends_l.append(j)
                    i = j
            starts, ends = torch.tensor(starts_l), torch.tensor(ends_l)
        if self.shuffle:
            perm = torch.randperm(starts.numel(), generator=g)
            starts, ends = starts[perm], ends[perm]
        self._plan_cache = (epoch, order, starts, ends)
        return order, starts, ends

    def __len__(self) -> int:
        """Batches in the current epoch (with `max_tokens` it can differ a little between epochs)."""
        return self._plan(self.epoch)[1].numel()

    # -- batches -------------------------------------------------------------------------------

    def _collate(self, idx: torch.Tensor) -> Batch:
        lens = self._lengths[idx]  # (B,)
        width = self._padded(int(lens.max()))
        pos = torch.arange(width)
        mask = pos[None, :] < lens[:, None]  # (B, L)
        starts = self.seqs.offsets[idx if self.index is None else self.index[idx]]  # (B,)
        src = (starts[:, None] + pos[None, :]).clamp_max(max(self.seqs.num_tokens - 1, 0))
        input_ids = torch.where(mask, self.seqs.ids[src].long(), self.pad_id)  # (B, L) int64
        batch = Batch(input_ids, mask.long())
        return batch.pin_memory() if self.pin_memory and torch.cuda.is_available() else batch

    def next_batch(self) -> Batch:
        """The next batch, moving into the next epoch when the current one is used up (never ends)."""
        order, starts, ends = self._plan(self.epoch)
        if self.position >= starts.numel():
            self.epoch += 1
            self.position = 0
            order, starts, ends = self._plan(self.epoch)
        k = self.position
        self.position += 1  # counted before the batch is used: a checkpoint taken now resumes after it
        return self._collate(order[starts[k] : ends[k]])

    def __iter__(self) -> Iterator[Batch]:
        """The remaining batches of the current epoch; afterwards the epoch counter moves on."""
        order, starts, ends = self._plan(self.epoch)
        while self.position < starts.numel():
            k = self.position
            self.position += 1
            yield self._collate(order[starts[k] : ends[k]])
        self.epoch += 1
        self.position = 0

    # -- resumption ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """{epoch, position, seed, num_sequences}: where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_sequences": self._count()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`; the loader must be built on the same sequences and arguments."""
        n = state.get("num_sequences", self._count())
        if n != self._count():
            raise ValueError(f"data state is for {n} sequences, this loader has {self._count()}: another corpus?")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._plan_cache = None


class EpochBatches:
    """Endless, resumable training batches: epoch e is one pass in the order seeded by `epoch_seed(seed, e)`.

    The data position (epoch, batches taken from it) is the checkpointed state; resuming rebuilds the epoch's
    order from its seed and skips the batches already taken (padding only, no model work).

    Args:
        make_epoch: seed → iterator over one epoch's batches (dicts of CPU tensors).
        seed: the run's seed.
    """

    def __init__(self, make_epoch: Callable[[int], Iterator[dict]], seed: int):
        self.make_epoch, self.seed = make_epoch, seed
        self.epoch = 0
        self.position = 0
        self._it: Iterator[dict] | None = None

    def next_batch(self) -> dict:
        while True:
            if self._it is None:
                self._it = self.make_epoch(epoch_seed(self.seed, self.epoch))
                for _ in range(self.position):
                    next(self._it, None)
            batch = next(self._it, None)
            if batch is not None:
                self.position += 1
                return batch
            if self.position == 0:
                raise ValueError("the training data yields no batch: give more examples or lower --batch-size")
            self.epoch, self.position, self._it = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None

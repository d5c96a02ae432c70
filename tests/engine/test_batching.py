"""Batching: length-grouped resumable batches, epoch seeds, padding, resumable epoch batches, device moves."""

import copy

import pytest
import torch

from engine.batching import Batch, EpochBatches, LengthGroupedBatches, epoch_seed, pad_to_multiple, to_device
from tests.engine.test_corpus import _ids_of, _synthetic

# ---------------------------------------------------------------------------------------------
# LengthGroupedBatches
# ---------------------------------------------------------------------------------------------


def _check_batch(batch: Batch, lists, pad_id):
    b, width = batch.input_ids.shape
    assert width % 8 == 0 and batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.int64
    assert batch.attention_mask.shape == (b, width)
    for row, i in enumerate(_ids_of(batch)):
        n = len(lists[i])
        assert batch.input_ids[row, :n].tolist() == lists[i]
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert (batch.input_ids[row, n:] == pad_id).all()
    assert width - 8 < max(len(lists[i]) for i in _ids_of(batch))  # padded no further than needed


def test_batches_cover_every_sequence_once_per_epoch():
    lists = _synthetic(1000)
    loader = LengthGroupedBatches(lists, batch_size=32, pad_id=0, seed=3, bucket_batches=10)
    assert len(loader) == 32  # ceil(1000 / 32)
    for epoch in range(2):
        seen = []
        for batch in loader:
            _check_batch(batch, lists, pad_id=0)
            assert batch.input_ids.shape[0] <= 32
            seen += _ids_of(batch)
        assert sorted(seen) == list(range(1000))
        assert loader.state_dict()["epoch"] == epoch + 1


def test_length_grouping_reduces_padding():
    lists = _synthetic(2000)
    lengths = torch.tensor([len(s) for s in lists])

    def padding(batches_of_lengths):
        return sum(len(b) * (-(-max(b) // 8) * 8) - sum(b) for b in batches_of_lengths)

    loader = LengthGroupedBatches(lists, batch_size=32, pad_id=0, seed=0)
    grouped = [[len(lists[i]) for i in _ids_of(b)] for b in loader]
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    random = [lengths[perm[i : i + 32]].tolist() for i in range(0, 2000, 32)]
    assert padding(grouped) < 0.25 * padding(random)


def test_epochs_differ_and_are_reproducible():
    lists = _synthetic(300)
    a = LengthGroupedBatches(lists, batch_size=16, pad_id=0, seed=5)
    first = [_ids_of(b) for b in a]
    second = [_ids_of(b) for b in a]
    assert first != second  # each epoch reshuffles
    b = LengthGroupedBatches(lists, batch_size=16, pad_id=0, seed=5)
    assert [_ids_of(x) for x in b] == first
    c = LengthGroupedBatches(lists, batch_size=16, pad_id=0, seed=6)
    assert [_ids_of(x) for x in c] != first
    fixed = LengthGroupedBatches(lists, batch_size=16, pad_id=0, shuffle=False)
    assert [_ids_of(x) for x in fixed] == [_ids_of(x) for x in fixed]


def test_token_budget():
    lists = _synthetic(500, hi=200)
    loader = LengthGroupedBatches(lists, batch_size=64, pad_id=3, max_tokens=2048, seed=0)
    seen = []
    for batch in loader:
        _check_batch(batch, lists, pad_id=3)
        assert batch.input_ids.numel() <= 2048 and batch.input_ids.shape[0] <= 64
        seen += _ids_of(batch)
    assert sorted(seen) == list(range(500))
    # a sequence longer than the budget still gets a batch of its own
    single = LengthGroupedBatches([[1, 10] + [5] * 100 + [2]], batch_size=4, pad_id=0, max_tokens=16)
    assert single.next_batch().input_ids.shape == (1, 104)


@pytest.mark.parametrize("consume", ["next_batch", "iter"])
def test_resume_reproduces_the_remaining_batches(consume):
    lists = _synthetic(200)
    kwargs = dict(batch_size=16, pad_id=0, seed=11, bucket_batches=4)
    loader = LengthGroupedBatches(lists, **kwargs)
    n_per_epoch = len(loader)
    if consume == "next_batch":
        for _ in range(5):
            loader.next_batch()
    else:
        for i, _ in enumerate(loader):
            if i == 4:
                break
    state = copy.deepcopy(loader.state_dict())
    assert state == {"epoch": 0, "position": 5, "seed": 11, "num_sequences": 200}
    # the rest of epoch 0 and all of epoch 1 and 2: across epoch boundaries
    expected = [loader.next_batch() for _ in range(3 * n_per_epoch)]
    resumed = LengthGroupedBatches(lists, **{**kwargs, "seed": 0})  # the seed comes from the state
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_batch() for _ in expected), strict=True):
        assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.attention_mask, got.attention_mask)
    assert resumed.state_dict() == loader.state_dict()
    # epoch-style iteration after a resume yields exactly the rest of that epoch
    again = LengthGroupedBatches(lists, **kwargs)
    again.load_state_dict(state)
    assert len(list(again)) == n_per_epoch - 5
    with pytest.raises(ValueError, match="sequences"):
        LengthGroupedBatches(lists[:-1], **kwargs).load_state_dict(state)


def test_batch_to_and_empty_input():
    batch = LengthGroupedBatches([[1, 2, 3]], batch_size=2, pad_id=0).next_batch()
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids)
    with pytest.raises(ValueError, match="no sequences"):
        LengthGroupedBatches([], batch_size=2, pad_id=0)


def test_pad_to_multiple():
    values, mask = pad_to_multiple([[5, 6, 7], [8]], pad_value=0)
    assert values.tolist() == [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    values, _ = pad_to_multiple([list(range(9))], pad_value=-1, multiple_of=4)
    assert values.shape == (1, 12) and values[0, 9:].tolist() == [-1, -1, -1]


def test_epoch_seed_separates_seed_and_epoch():
    seeds = {epoch_seed(s, e) for s in range(20) for e in range(20)}
    assert len(seeds) == 400  # (seed 0, epoch 1) and (seed 1, epoch 0) differ, unlike seed + epoch
    assert epoch_seed(3, 4) == epoch_seed(3, 4) and 0 <= epoch_seed(3, 4) < 2**63


def test_epoch_batches_resume_mid_epoch_and_roll_over():
    def make_epoch(s):
        order = torch.randperm(5, generator=torch.Generator().manual_seed(s)).tolist()
        return iter([{"i": torch.tensor(i)} for i in order])

    full = EpochBatches(make_epoch, seed=7)
    taken = [int(full.next_batch()["i"]) for _ in range(12)]
    assert sorted(taken[:5]) == sorted(taken[5:10]) == list(range(5))  # every example once an epoch
    assert taken[:5] != taken[5:10]  # a new order each epoch
    part = EpochBatches(make_epoch, seed=7)
    for _ in range(7):
        part.next_batch()
    again = EpochBatches(make_epoch, seed=7)
    again.load_state_dict(part.state_dict())
    assert [int(again.next_batch()["i"]) for _ in range(5)] == taken[7:12]
    with pytest.raises(ValueError, match="yields no batch"):
        EpochBatches(lambda s: iter([]), seed=0).next_batch()


def test_to_device_moves_dicts_and_dataclasses():
    batch = Batch(torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved, Batch) and torch.equal(moved.input_ids, batch.input_ids)
    d = to_device({"a": torch.zeros(3), "n": 4}, torch.device("cpu"))
    assert d["n"] == 4 and torch.equal(d["a"], torch.zeros(3))

"""engine.masking: which tokens get chosen, how they are corrupted, and that it never syncs the host.

Statistical checks use 5-sigma bounds (binomial standard deviations), so a correct implementation
fails them with probability ~1e-6 each; all draws come from seeded generators, so runs repeat.
"""

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.masking import mask_tokens, smoothing_weights

V = 1000
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # BERT's layout
SPECIAL = torch.tensor([UNK, SEP, PAD, CLS, MASK])
N_ALLOWED = V - len(SPECIAL)


def _batch(b=16, width=32, seed=0):
    """A padded batch like LengthGroupedBatches makes: [CLS] tokens [SEP] then [PAD]; a few [UNK] inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, width + 1, (b,), generator=g)
    ids = torch.randint(104, V, (b, width), generator=g)
    pos = torch.arange(width)
    ids[:, 0] = CLS
    ids = torch.where(pos == (lengths - 1)[:, None], SEP, ids)
    ids = torch.where(pos >= lengths[:, None], PAD, ids)
    ids[0, 1] = UNK
    mask = (pos < lengths[:, None]).long()
    return ids, mask


def _real(ids, mask):
    return mask.bool() & ~torch.isin(ids, SPECIAL)


def _sigma(p, n):
    return math.sqrt(p * (1 - p) / n)


def test_chooses_exactly_round_p_n_real_and_never_specials():
    g = torch.Generator().manual_seed(0)
    chosen_per_pos = torch.zeros(16, 32)
    ids, mask = _batch()
    real = _real(ids, mask)
    draws = 400
    for _ in range(draws):
        masked, labels = mask_tokens(ids, mask, SPECIAL, MASK, V, generator=g)
        chosen = labels != -100
        assert masked.shape == labels.shape == ids.shape and masked.dtype == labels.dtype == torch.int64
        assert int(chosen.sum()) == round(0.15 * int(real.sum()))  # exact per batch, not only on average
        assert not (chosen & ~real).any()  # never [CLS] [SEP] [UNK] [PAD]
        assert torch.equal(labels[chosen], ids[chosen])
        assert torch.equal(masked[~chosen], ids[~chosen])  # nothing outside the targets changes
        chosen_per_pos += chosen
    # every real position is equally likely: rate 0.15 within 5 sigma at each one
    rate = chosen_per_pos[real] / draws
    p = round(0.15 * int(real.sum())) / int(real.sum())
    assert (rate - p).abs().max() < 5 * _sigma(p, draws)
    assert (chosen_per_pos[~real] == 0).all()


@pytest.mark.parametrize("seed", [1, 2])
def test_counts_on_other_batches_and_probabilities(seed):
    g = torch.Generator().manual_seed(seed)
    for b, width, p in [(3, 8, 0.15), (64, 128, 0.15), (8, 24, 0.5), (5, 16, 0.0)]:
        ids, mask = _batch(b, width, seed)
        _, labels = mask_tokens(ids, mask, SPECIAL, MASK, V, mlm_probability=p, generator=g)
        assert int((labels != -100).sum()) == round(p * int(_real(ids, mask).sum()))


def test_80_10_10_split():
    g = torch.Generator().manual_seed(0)
    ids, mask = _batch(32, 64)
    n = n_mask = n_random = n_kept = 0
    for _ in range(150):
        masked, labels = mask_tokens(ids, mask, SPECIAL, MASK, V, generator=g)
        chosen = labels != -100
        new, old = masked[chosen], ids[chosen]
        n += new.numel()
        n_mask += int((new == MASK).sum())
        n_random += int(((new != MASK) & (new != old)).sum())
        n_kept += int((new == old).sum())
        assert not torch.isin(masked[chosen & (masked != MASK)], SPECIAL).any()  # random ids are never specials
    # a random draw equals the original token with chance 1/N_ALLOWED: it then counts as kept
    expect = {"mask": 0.8, "random": 0.1 * (1 - 1 / N_ALLOWED), "kept": 0.1 + 0.1 / N_ALLOWED}
    for name, got in (("mask", n_mask), ("random", n_random), ("kept", n_kept)):
        assert abs(got / n - expect[name]) < 5 * _sigma(expect[name], n), name


def test_random_replacements_are_uniform_over_non_special_ids():
    vocab, special = 20, torch.tensor([0, 3, 7, 7, 19])  # duplicates allowed
    allowed = [i for i in range(vocab) if i not in special.tolist()]
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(allowed * 40).view(8, -1)  # (8, 75)
    mask = torch.ones_like(ids)
    hist = torch.zeros(vocab)
    for _ in range(60):
        masked, labels = mask_tokens(
            ids, mask, special, 7, vocab, mlm_probability=0.5, mask_replace=0.0, random_replace=1.0, generator=g
        )
        hist += torch.bincount(masked[labels != -100], minlength=vocab)
    assert hist[special].sum() == 0
    expected = hist.sum() / len(allowed)
    chi2 = float(((hist[allowed] - expected) ** 2 / expected).sum())
    assert chi2 < 50  # 14 degrees of freedom: P(chi2 > 50) ≈ 1e-5


def test_weighted_choice_matches_sampling_without_replacement():
    # One row [CLS] a..f [SEP], weights 1, 2, 4 … 32, k = round(6/3) = 2: the exponential race must
    # give each token the inclusion probability of drawing 2 without replacement with probability
    # ∝ w (0.042 … 0.814), which a proportional Bernoulli (2w/63 = 0.032 … 1) misses by > 5 sigma.
    w_tok = 2.0 ** torch.arange(6.0)
    weights = torch.zeros(V)
    weights[200:206] = w_tok
    ids = torch.tensor([[CLS, 200, 201, 202, 203, 204, 205, SEP]])
    mask = torch.ones_like(ids)
    total = float(w_tok.sum())
    exact = [
        wi / total + sum(wj / total * wi / (total - wj) for j, wj in enumerate(w_tok.tolist()) if j != i)
        for i, wi in enumerate(w_tok.tolist())
    ]
    g = torch.Generator().manual_seed(0)
    draws = 5000
    hits = torch.zeros(8)
    for _ in range(draws):
        _, labels = mask_tokens(ids, mask, SPECIAL, MASK, V, mlm_probability=1 / 3, token_weights=weights, generator=g)
        hits += (labels[0] != -100).float()
    assert hits[0] == hits[7] == 0
    for i, p in enumerate(exact):
        assert abs(hits[i + 1] / draws - p) < 5 * _sigma(p, draws), (i, float(hits[i + 1] / draws), p)


def test_smoothing_weights():
    counts = torch.tensor([5, 0, 1, 1000, 10, 7])
    w = smoothing_weights(counts, 0.7, special_token_ids=[0, 5])
    assert w.dtype == torch.float32 and w.shape == (6,)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 1.0, 1000**-0.7, 10**-0.7, 0.0]))
    assert torch.equal(smoothing_weights(counts, 0.0), torch.ones(6))


def test_smoothing_shifts_choice_toward_rare_tokens():
    common, rare = 500, 600
    counts = torch.ones(V, dtype=torch.int64)
    counts[common], counts[rare] = 100_000, 10
    weights = smoothing_weights(counts, 0.7, SPECIAL)
    ids, mask = _batch(16, 64)
    # half of every row's real tokens common, half rare
    ids = torch.where(_real(ids, mask), torch.where(torch.arange(64) % 2 == 0, common, rare), ids)
    real = _real(ids, mask)
    g = torch.Generator().manual_seed(0)

    def rates(token_weights):
        chosen = torch.zeros_like(ids, dtype=torch.float32)
        for _ in range(50):
            _, labels = mask_tokens(ids, mask, SPECIAL, MASK, V, token_weights=token_weights, generator=g)
            chosen += (labels != -100).float()
        return (chosen[real & (ids == rare)].mean() / chosen[real & (ids == common)].mean()).item()

    assert 0.8 < rates(None) < 1.25  # uniform: rare and common equally likely
    assert rates(weights) > 20  # counts^-0.7: a rare occurrence is (10^4)^0.7 ≈ 630 times as likely


def test_zero_weight_tokens_are_never_chosen():
    weights = torch.ones(V)
    weights[::2] = 0.0  # even ids never chosen, even if fewer than k odd ones remain
    ids, mask = _batch(8, 32)
    real = _real(ids, mask)
    g = torch.Generator().manual_seed(0)
    for p in (0.15, 0.9):
        _, labels = mask_tokens(ids, mask, SPECIAL, MASK, V, mlm_probability=p, token_weights=weights, generator=g)
        chosen = labels != -100
        assert (labels[chosen] % 2 == 1).all()
        expect = min(round(p * int(real.sum())), int((real & (ids % 2 == 1)).sum()))
        assert int(chosen.sum()) == expect


def test_deterministic_with_a_generator_and_leaves_global_rng_alone():
    ids, mask = _batch()
    weights = smoothing_weights(torch.randint(0, 100, (V,)), 0.7, SPECIAL)
    for tw in (None, weights):
        state = torch.get_rng_state()
        a = mask_tokens(ids, mask, SPECIAL, MASK, V, token_weights=tw, generator=torch.Generator().manual_seed(7))
        b = mask_tokens(
            ids, mask, SPECIAL.tolist(), MASK, V, token_weights=tw, generator=torch.Generator().manual_seed(7)
        )
        c = mask_tokens(ids, mask, SPECIAL, MASK, V, token_weights=tw, generator=torch.Generator().manual_seed(8))
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[1], c[1])


def test_nothing_to_mask():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [PAD, PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    masked, labels = mask_tokens(ids, mask, SPECIAL, MASK, V)
    assert torch.equal(masked, ids) and (labels == -100).all()


# Ops that make the host wait for the device (on CUDA): reading a value (item, bool, int, tolist
# all end in _local_scalar_dense), or ops whose output shape depends on the data.
_SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "item"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flat = list(itertools.chain(args, (kwargs or {}).values()))
        bool_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in flat
            if isinstance(a, list | tuple)
            for i in a
        )
        if name in _SYNCING or bool_index or (name == "repeat_interleave" and "output_size" not in (kwargs or {})):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weighted", [False, True])
def test_no_host_sync_in_the_op_trace(weighted):
    """CPU stand-in for CUDA's sync debug mode: no op in mask_tokens reads a value or needs a data-dependent shape."""
    ids, mask = _batch()
    weights = smoothing_weights(torch.randint(0, 100, (V,)), 0.7, SPECIAL) if weighted else None
    recorder = _OpRecorder()
    with recorder:
        mask_tokens(ids, mask, SPECIAL, MASK, V, token_weights=weights, generator=torch.Generator().manual_seed(0))
    assert recorder.syncs == []
    # and the recorder does catch a sync
    with recorder:
        ids.sum().item()
    assert recorder.syncs


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [False, True])
def test_no_host_sync_on_cuda(weighted):
    ids, mask = (t.cuda() for t in _batch(64, 128))
    special = SPECIAL.cuda()
    weights = smoothing_weights(torch.randint(0, 100, (V,), device="cuda"), 0.7, special) if weighted else None
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masked, labels = mask_tokens(ids, mask, special, MASK, V, token_weights=weights, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int((labels != -100).sum()) == round(0.15 * int(_real(ids.cpu(), mask.cpu()).sum()))

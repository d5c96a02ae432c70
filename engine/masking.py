"""Dynamic MLM masking on the device, without host syncs (step 2 of DESIGN.md's distillation step).

Per batch, k = round(p · n_real) of the n_real real tokens (attention_mask = 1 and not a special
id) are chosen, without replacement, with probability ∝ a per-token weight (uniform, or the
DistilBERT code's `token_probs` = counts^-0.7 for `mlm_smoothing`). Of the chosen, 80% become
[MASK], 10% a random non-special token, 10% stay; labels hold the original id there, -100 elsewhere.

How k positions are drawn without the host knowing k. The original calls
`torch.multinomial(probs, n_tgt, replacement=False)` with `n_tgt` computed by `.item()`; `topk`
likewise needs k as a Python int. Both are a host sync a step. Instead we use the exponential race
(Efraimidis & Spirakis 2006; the Gumbel-top-k trick, Kool et al. 2019): with E_i ~ Exp(1), the k
positions with the smallest keys E_i / w_i are a sample of k without replacement with probability
∝ w, the same distribution as sequential multinomial sampling. We take the rank of every key from
one argsort (B·L keys: microseconds on a GPU) and choose `rank < k`, a comparison with a 0-dim
device tensor. So the count per batch is exact — always round(p · n_real), not only in
expectation — and nothing waits for the host. (A per-token Bernoulli with its probability scaled
to an expected 15% also avoids the sync, but with weights the scaled probabilities exceed 1 for
rare tokens and need clipping, which biases both the count and the distribution.)

The random replacement token is drawn uniformly from the non-special ids by inverse CDF: with
c = cumsum(not special) over the vocabulary, id = searchsorted(c, r) for r uniform in
1…c[-1]. `randint` would need the count of allowed ids on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def smoothing_weights(
    counts: torch.Tensor, exponent: float = 0.7, special_token_ids: torch.Tensor | Sequence[int] | None = None
) -> torch.Tensor:
    """Masking weights counts^-exponent (the DistilBERT code's `token_probs` for `mlm_smoothing`).

    Rare tokens get larger weights, so masking shifts toward them. Counts of 0 are taken as 1 (as
    the original's `np.maximum(counts, 1)`), giving unseen ids the largest weight rather than inf.

    Args:
        counts: (V,) integer or float token counts (`engine.corpus.token_counts`).
        exponent: the smoothing exponent (`mlm_smoothing`, 0.7 in the recipe; 0 gives uniform).
        special_token_ids: ids whose weight is set to 0 (never chosen).

    Returns:
        (V,) float32 on counts' device.
    """
    w = counts.to(torch.float64).clamp_min(1.0).pow(-exponent).to(torch.float32)
    if special_token_ids is not None:
        w[torch.as_tensor(special_token_ids, dtype=torch.int64, device=w.device)] = 0.0
    return w


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_token_ids: torch.Tensor | Sequence[int],
    mask_token_id: int,
    vocab_size: int,
    mlm_probability: float = 0.15,
    mask_replace: float = 0.8,
    random_replace: float = 0.1,
    token_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose MLM targets and corrupt the input, all on input_ids' device with no host sync.

    Args:
        input_ids: (B, L) int64 token ids (< vocab_size).
        attention_mask: (B, L) int or bool, nonzero for real tokens.
        special_token_ids: (S,) int64 ids never chosen nor drawn as random replacements: at least
            the tokenizer's `all_special_ids` ([CLS], [SEP], [PAD], [MASK], [UNK]). Pass a tensor
            already on the device: a Python list is copied to the device each call, which on CUDA
            waits for the stream.
        mask_token_id: the [MASK] id.
        vocab_size: the tokenizer's vocabulary size; random replacements are drawn below it.
        mlm_probability: the fraction of real tokens chosen per batch (exactly round(p · n_real)).
        mask_replace: of the chosen, the probability of becoming [MASK].
        random_replace: of the chosen, the probability of becoming a random non-special token
            (the remaining 1 - mask_replace - random_replace are kept as they are).
        token_weights: optional (vocab_size,) float weights, e.g. `smoothing_weights(counts)`;
            a token's chance to be chosen ∝ its weight. Ids of weight 0 are never chosen.
        generator: a torch.Generator on input_ids' device; the same generator state gives the
            same result. None uses the global RNG.

    Returns:
        (masked_input_ids, labels): both (B, L) int64; labels are the original ids at chosen
        positions and -100 elsewhere.

    The 80/10/10 split is drawn independently per chosen token (as in the original), so its
    proportions hold in expectation; the number chosen per batch is exact. Rows are not balanced:
    one row may get more targets than another (also as in the original, which samples over the
    flattened batch).
    """
    device = input_ids.device
    shape = input_ids.shape  # (B, L)
    special_ids = torch.as_tensor(special_token_ids, dtype=torch.int64, device=device)
    is_special = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    is_special[special_ids] = True  # index_put: duplicates are harmless, no data-dependent shape
    real = attention_mask.bool() & ~is_special[input_ids]  # (B, L)

    # k = round(p · n_real) stays a 0-dim device tensor.
    k = torch.round(real.sum() * mlm_probability).long()

    # Exponential race: keys E / w, smallest k win (see the module docstring).
    u = torch.rand(shape, generator=generator, device=device)
    exp = -torch.log1p(-u)  # Exp(1); u ∈ [0, 1) keeps it finite
    if token_weights is None:
        selectable = real
        key = torch.where(selectable, exp, torch.inf)
    else:
        w = token_weights.to(device=device, dtype=torch.float32)[input_ids]  # (B, L)
        selectable = real & (w > 0)
        key = torch.where(selectable, exp / w.clamp_min(torch.finfo(torch.float32).tiny), torch.inf)
    flat = key.flatten()
    order = torch.argsort(flat, stable=True)  # stable: ties resolve by position, deterministically
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=device))
    chosen = (rank.view(shape) < k) & selectable  # (B, L); fewer than k only if fewer are selectable

    # 80/10/10 of the chosen, one uniform per position.
    r = torch.rand(shape, generator=generator, device=device)
    to_mask = chosen & (r < mask_replace)
    to_random = chosen & (r >= mask_replace) & (r < mask_replace + random_replace)

    # A uniform non-special id by inverse CDF over the allowed ids (no host-side count needed).
    allowed_cum = torch.cumsum(~is_special, 0)  # (V,) int64; allowed_cum[-1] = number allowed
    n_allowed = allowed_cum[-1]
    draw = torch.rand(shape, generator=generator, device=device)
    # floor(draw · n) can round up to n in fp32 when draw is just below 1, hence the clamp
    target = torch.minimum((draw * n_allowed).long(), n_allowed - 1) + 1  # (B, L) in 1…n_allowed
    random_ids = torch.searchsorted(allowed_cum, target)  # the target-th allowed id

    masked = torch.where(to_mask, mask_token_id, torch.where(to_random, random_ids, input_ids))
    labels = torch.where(chosen, input_ids, -100)
    return masked, labels

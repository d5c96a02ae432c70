"""Pure-PyTorch reference of the sparse-target KD+CE op (`kernels.sparse_kd`): the contract, the CPU path, the oracle.

Per row n with student logits z (V,), the teacher's top-K logits t_k at vocabulary ids i_k (distinct, in [0, V)),
the teacher's log-sum-exp L = log Σ_v exp(t_v/T) over its whole row, temperature T, label y, smoothing ε:

    q_k    = exp(t_k/T − L)                       the teacher's kept probabilities, exact
    q_tail = max(0, 1 − Σ_k q_k)                  the teacher's mass outside the K ids (0 when K = V)
    p      = softmax(z/T),  s_tail = Σ_{v∉K} p_v  the student's distribution and its mass outside the K ids
    kd_row = T² [Σ_k q_k (log q_k − log p_{i_k}) + q_tail (log q_tail − log s_tail)]    (0 where kd_mask is False)
    ce_row = (1−ε)(lse(z) − z_y) + ε (lse(z) − mean_v z_v)                                (0 where y == ignore_index)

that is T²·KL between the teacher's top-K distribution with its tail as one bucket and the student's distribution
bucketed the same way. Gradient (derived in `kernels.sparse_kd`), with r = q_tail / s_tail (0 when q_tail = 0 or
s_tail = 0) and Q' = Σ_k q_k + q_tail (1, up to the rounding of stored targets):

    grad[n, v] = kd_scale · T (Q' p_v − q_v)          v ∈ K
               = kd_scale · T p_v (Q' − r)            v ∉ K
               + ce_scale · (softmax(z)_v − (1−ε) onehot(y)_v − ε/V)

Here s_tail is summed over the tail directly; the kernel forms it as (d_s − d_K)/d_s in fp64 (see there).
0·log 0 = 0 for q_k = 0 (teacher −inf in the kept set) and q_tail = 0. A NaN in a selected row, an id outside
[0, V), or a teacher whose L is −inf gives NaN for the KD row and the whole gradient row. Repeated ids in a row are
outside the contract (the reference writes the gradient of the last one).
"""

import math

import torch


def _scale(x, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=ref.dtype, device=ref.device)


def sparse_kd_ce_rows_reference(
    student: torch.Tensor,  # (N, V) any float dtype
    topk_logits: torch.Tensor,  # (N, K) any float dtype: the teacher's logits at topk_indices (not divided by T)
    topk_indices: torch.Tensor,  # (N, K) int: vocabulary ids, distinct per row
    teacher_lse: torch.Tensor,  # (N,) float: logsumexp(t/T) over the teacher's whole row
    labels: torch.Tensor | None,  # (N,) int, ignore_index for rows without a label; None: no CE
    kd_mask: torch.Tensor | None = None,  # (N,) bool rows that take the KD term; None: all
    temperature: float = 1.0,
    kd_scale: float | torch.Tensor = 0.0,
    ce_scale: float | torch.Tensor = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row sparse KD and CE losses and the combined student-logit gradient (module docstring).

    Returns:
        kd_row (N,) and ce_row (N,) fp32 (fp64 for fp64 students), grad (N, V) in the student's dtype or None.
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(acc)
    n, v = s.shape
    k = topk_logits.shape[1]
    inv_t = 1.0 / temperature
    rows = torch.ones(n, dtype=torch.bool, device=s.device) if kd_mask is None else kd_mask.bool()
    idx = topk_indices.long()
    bad = ((idx < 0) | (idx >= v)).any(1)  # an id outside [0, V) poisons its KD row (never looked up)
    idx = idx.clamp(0, max(v - 1, 0))
    log_q = topk_logits.to(acc) * inv_t - teacher_lse.to(acc)[:, None]  # (N, K), exact: no exp/log round trip
    q = log_q.exp()
    log_p = torch.log_softmax(s * inv_t, dim=-1)  # (N, V)
    log_pk = log_p.gather(1, idx)  # (N, K)
    kept = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, idx, True)
    if k < v:
        q_tail = (1 - q.sum(1)).clamp_min(0)
        log_s_tail = torch.logsumexp(log_p.masked_fill(kept, -math.inf), dim=1)  # −inf for an empty tail
    else:  # the whole vocabulary is kept: no tail
        q_tail = torch.zeros_like(q[:, 0])
        log_s_tail = torch.full_like(q_tail, -math.inf)
    # q·(log q − log p) with 0·log 0 = 0: `q == 0`, not `q > 0`, so that a NaN q stays NaN.
    kl = torch.where(q == 0, 0.0, q * (log_q - log_pk)).sum(1)
    kl = kl + torch.where(q_tail == 0, 0.0, q_tail * (q_tail.log() - log_s_tail))
    kl = kl.masked_fill(bad, math.nan)
    kd_row = torch.where(rows, kl * temperature**2, torch.zeros_like(kl))
    grad = None
    if compute_grad:
        r = torch.where((q_tail == 0) | (log_s_tail == -math.inf), 0.0, (q_tail.log() - log_s_tail).exp())
        q_all = q.sum(1, keepdim=True) + q_tail[:, None]  # 1 up to rounding (Q' in kernels.sparse_kd)
        p = log_p.exp()
        g = p * (q_all - r[:, None])  # the tail entries; the kept ones are overwritten next
        g.scatter_(1, idx, q_all * p.gather(1, idx) - q)
        g = g * (temperature * _scale(kd_scale, s))
        g = g.masked_fill(kl.isnan()[:, None], math.nan).masked_fill(~rows[:, None], 0.0)
        grad = g
    ce_row = torch.zeros_like(kd_row)
    if labels is not None:
        labels = labels.long()
        valid = labels != ignore_index
        out = valid & ((labels < 0) | (labels >= v))
        y = labels.masked_fill(~valid | out, 0)
        log_c = torch.log_softmax(s, dim=-1)
        nll = -log_c.gather(1, y[:, None]).squeeze(1)
        if label_smoothing > 0:
            nll = (1 - label_smoothing) * nll - label_smoothing * log_c.mean(-1)
        ce_row = torch.where(valid, nll.masked_fill(out, math.nan), ce_row)
        if compute_grad:
            gc = log_c.exp_()
            if label_smoothing > 0:
                gc.sub_(label_smoothing / v)
            gc.scatter_add_(1, y[:, None], torch.full_like(s[:, :1], -(1 - label_smoothing)))
            gc = gc * _scale(ce_scale, s)
            gc = gc.masked_fill(~valid[:, None], 0.0).masked_fill(out[:, None], math.nan)
            grad = grad + gc
    if grad is not None:
        grad = grad.to(student.dtype)
    return kd_row, ce_row, grad

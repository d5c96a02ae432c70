"""Pure-PyTorch references for every kernel in `kernels/`.

They define the contracts the Triton kernels implement, run on CPU when no kernel can, and are the
oracle that tests and benchmarks share. They compute in fp32 (or in the input dtype when it is
fp64, which is how the tests build their fp64 "truth").

Row-loss contract of the single-pass distillation kernel (`kd_ce_rows`), per row n with student
logits s, teacher logits t, temperature T, p_s = softmax(s/T), p_t = softmax(t/T), q = softmax(s):

    kd_row[n] = T² · Σ_v p_t,v (log p_t,v − log p_s,v)            (0 where kd_mask[n] is False)
    ce_row[n] = (1−ε)(lse(s) − s_y) + ε (lse(s) − mean_v s_v)       (0 where y == ignore_index)
    grad[n]   = kd_scale · T (p_s − p_t) + ce_scale · (q − (1−ε) onehot(y) − ε/V)

kd_scale and ce_scale are the weights the caller gives each row's term in its final loss (for a
mean: weight / count); they may be 0-dim device tensors so that no count ever visits the host.
Teacher entries of −inf have p_t = 0 and contribute nothing (0·log 0 = 0). NaN in a selected row, or a
teacher row that is −inf throughout, gives NaN for the row and its gradient; a label outside [0, V) that
is not ignore_index gives a NaN CE row and a NaN gradient row (never an out-of-bounds read).
"""

import math

import torch


def _centered(x: torch.Tensor) -> torch.Tensor:
    """x − its row maximum, a new row-major tensor (so that row sums add in the same order whatever x's strides). A
    row of only −inf becomes NaN: it holds no distribution, as in torch."""
    return torch.sub(x, x.amax(dim=-1, keepdim=True)).contiguous()


def _scale(x, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=ref.dtype, device=ref.device)


def kd_ce_rows_reference(
    student: torch.Tensor,  # (N, V) any float dtype
    teacher: torch.Tensor | None,  # (N, V) any float dtype, or None for CE only
    labels: torch.Tensor | None,  # (N,) int, ignore_index for rows without a label; None: no CE
    kd_mask: torch.Tensor | None = None,  # (N,) bool, rows that take the KD term; None: all rows
    temperature: float = 1.0,
    kd_scale: float | torch.Tensor = 0.0,
    ce_scale: float | torch.Tensor = 0.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row KD and CE losses and the combined student-logit gradient (see the module docstring).

    Returns:
        kd_row (N,) and ce_row (N,) in fp32 (fp64 for fp64 inputs), and the gradient (N, V) in the
        student's dtype (None unless `compute_grad`).
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s = student.to(acc)
    n, v = s.shape
    kd_row = s.new_zeros(n)
    ce_row = s.new_zeros(n)
    grad = None
    # Full-size temporaries are reused in place: on CPU this function is the production path, and
    # each [N, V] pass costs as much as the arithmetic.
    if teacher is not None:
        rows = torch.ones(n, dtype=torch.bool, device=s.device) if kd_mask is None else kd_mask.bool()
        # The kernel's fold (`kernels.distill`): with x = (s − max s)/T and u = (t − max t)/T (centred before the
        # division, which would otherwise round at |s/T|, the logits' size), d_s = Σ e^x, d_t = Σ e^u,
        #     KL = Σ_v e^u_v (u_v − x_v) / d_t + log(d_s/d_t),
        # whose terms have the size of the logits' spread; the log of the ratio is log1p((d_s − d_t)/d_t), exact
        # where the two sums are close. torch's Σ p_t (log p_t − log p_s) subtracts two log-probabilities of the
        # size of log V instead, which at T = 20 leaves ~1e-6 of noise in a KL of ~1e-2.
        x = _centered(s).div_(temperature)  # (N, V)
        u = _centered(teacher.to(acc)).div_(temperature)  # (N, V)
        e_t, e_s = u.exp(), x.exp()  # (N, V) each: p_t·d_t and p_s·d_s
        d_t, d_s = e_t.sum(-1), e_s.sum(-1)
        # 0·log 0 = 0 where p_t = 0 (t = −inf): the product is 0 or 0·(±inf) = NaN there and is set to 0. Where
        # p_t > 0 it is finite or +inf (the student rules out a teacher token). NaN in a row (or a row of −inf,
        # which centring turns into NaN) stays NaN, as in torch.
        a = u.sub_(x).mul_(e_t).masked_fill_(e_t == 0, 0.0).sum(-1)
        kl = a / d_t + torch.log1p((d_s - d_t) / d_t)
        kd_row = torch.where(rows, kl * temperature**2, kd_row)
        if compute_grad:
            p_t = e_t.div_(d_t[:, None])
            grad = e_s.div_(d_s[:, None]).sub_(p_t).mul_(temperature * _scale(kd_scale, s))  # T·scale·(p_s − p_t)
            grad.masked_fill_(~rows[:, None], 0.0)
    if labels is not None:
        labels = labels.long()
        valid = labels != ignore_index
        # A label outside [0, V) is not looked up (no out-of-bounds gather); its row becomes NaN below.
        bad = valid & ((labels < 0) | (labels >= v))
        y = labels.masked_fill(~valid | bad, 0)
        log_q = torch.log_softmax(s, dim=-1)  # (N, V); (s − max) − log Σ: no rounding at the logits' size
        nll = -log_q.gather(1, y[:, None]).squeeze(1)
        if label_smoothing > 0:
            nll = (1 - label_smoothing) * nll - label_smoothing * log_q.mean(-1)
        ce_row = torch.where(valid, nll.masked_fill(bad, math.nan), ce_row)
        if compute_grad:
            g = log_q.exp_()  # softmax(s)
            if label_smoothing > 0:
                g.sub_(label_smoothing / v)
            g.scatter_add_(1, y[:, None], torch.full_like(s[:, :1], -(1 - label_smoothing)))
            g.mul_(_scale(ce_scale, s)).masked_fill_(~valid[:, None], 0.0).masked_fill_(bad[:, None], math.nan)
            grad = g if grad is None else grad.add_(g)
    if compute_grad:
        grad = torch.zeros_like(s) if grad is None else grad
        grad = grad.to(student.dtype)
    return kd_row, ce_row, grad


def softmax_reference(x: torch.Tensor, temperature: float = 1.0, log: bool = False) -> torch.Tensor:
    """softmax(x/T) (or log_softmax) over the last dim, computed in fp32 (fp64 for fp64), returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc) / temperature
    y = torch.log_softmax(z, dim=-1) if log else torch.softmax(z, dim=-1)
    return y.to(x.dtype)


def softmax_backward_reference(y: torch.Tensor, dy: torch.Tensor, temperature: float = 1.0, log: bool = False):
    """Input gradient of `softmax_reference` from its output y and upstream gradient dy (in y's dtype).

    softmax: dx = y (dy − Σ dy·y) / T;  log_softmax: dx = (dy − exp(y) Σ dy) / T.
    """
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    y32, dy32 = y.to(acc), dy.to(acc)
    if log:
        dx = dy32 - y32.exp() * dy32.sum(-1, keepdim=True)
    else:
        dx = y32 * (dy32 - (dy32 * y32).sum(-1, keepdim=True))
    return (dx / temperature).to(y.dtype)


def cosine_rows_reference(
    student: torch.Tensor,  # (N, H) any float dtype
    teacher: torch.Tensor,  # (N, H) any float dtype
    mask: torch.Tensor | None = None,  # (N,) bool rows that count; None: all rows
    scale: float | torch.Tensor = 1.0,
    eps: float = 1e-8,
    compute_grad: bool = True,
    grad_dtype: torch.dtype | None = None,  # the gradient's dtype; None: the student's
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cosine loss 1 − cos(s, t) and its gradient with respect to s, times `scale`.

    cos = s·t / (max(‖s‖, eps) · max(‖t‖, eps)) (torch.nn.functional.cosine_similarity);
    ∂(1 − cos)/∂s = −t / (‖s‖‖t‖) + cos · s / ‖s‖²  (the second term only where ‖s‖ > eps, as the clamp is constant).

    Returns:
        loss_row (N,) fp32 (fp64 for fp64 students), 0 for unselected rows; grad (N, H) in the student's dtype, 0
        for unselected rows (None unless `compute_grad`).
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(acc), teacher.to(acc)
    norm_s, norm_t = s.norm(dim=-1), t.norm(dim=-1)
    ns, nt = norm_s.clamp_min(eps), norm_t.clamp_min(eps)
    cos = (s * t).sum(-1) / (ns * nt)
    rows = torch.ones_like(cos, dtype=torch.bool) if mask is None else mask.bool()
    loss_row = torch.where(rows, 1 - cos, torch.zeros_like(cos))
    if not compute_grad:
        return loss_row, None
    radial = torch.where(norm_s > eps, cos / (ns * ns), torch.zeros_like(cos))
    g = -(t / (ns * nt)[:, None]) + radial[:, None] * s
    g = torch.where(rows[:, None], g * _scale(scale, s), torch.zeros_like(g))
    return loss_row, g.to(student.dtype if grad_dtype is None else grad_dtype)

"""Distillation objectives on top of the model and the kernels.

Pretraining (DistilBERT's triple loss), per micro-batch:

    L = α_ce · T² · KL(softmax(t/T) ‖ softmax(s/T))   over KD rows ("batchmean" over rows)
      + α_mlm · CE(s, labels)                          over masked rows (labels −100 elsewhere)
      + α_cos · mean(1 − cos(h_s, h_t))                over non-pad rows

Rows are selected once: the non-pad positions are known on the host from the batch's attention
mask (built by the data loader on the CPU), so their indices reach the device with the batch and no
step waits on a device→host read. Student and teacher hidden states are packed to [N, H] with those
indices; the MLM transform runs on the packed rows only, and the vocabulary projection of both
models feeds the LM-head-fused kernel chunk by chunk, so no [N, V] logits tensor exists.
With `restrict_ce_to_mask` (and for MLM alone) the head runs on the masked rows only: they are
packed with one device→host read of their count per step, the one sync this option costs.

α_ce is the KD weight (`ObjectiveOptions.kd_weight`; the flag keeps the original code's name) and
`restrict_ce_to_mask` restricts the KD rows (`kd_masked_only`); the kernels' `ce_weight` is the MLM weight α_mlm.

Task-specific fine-tuning and distillation (`TaskLoss`, one micro-batch):
    fine-tuning:    L = CE(s, y)   (QA: ½(CE_start + CE_end), pads excluded)
    classification: L = α · CE(s, y) + (1 − α) · T² · KL(softmax(t/T) ‖ softmax(s/T))
    QA:             L = α_qa · ½(CE_start + CE_end) + α_ce · ½(KD_start + KD_end), pads excluded from KD
Every term's formula lives here once; `engine.hf` and the commands call these.

Many processes (`engine.distributed`): every rank receives the same global batch and keeps its rows (`Shard.rows`).
Each term above is a mean over rows of the *global* batch, so a rank returns its local mean × its share of those rows
(`RowShares`: local count / global count) and the ranks' losses sum to the 1-process loss, term by term. The counts
need no collective: pretraining masks the whole global batch on every rank (the same draws a 1-process run makes:
masking chooses exactly round(p·n_real) tokens of a batch, which no per-rank draw could reproduce), so every rank
knows the global non-pad and masked counts; task losses are means over the batch's examples.
"""

import math
from dataclasses import dataclass, field

import torch

from engine.batching import to_device
from engine.distributed import Shard
from engine.masking import mask_tokens
from engine.options import KDOptions, ObjectiveOptions
from kernels import (
    SparseTargets,
    cosine_loss,
    cross_entropy,
    distill_loss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
    sparse_distill_loss,
)


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor  # (B, L) int64, on the device: the whole (global) batch
    attention_mask: torch.Tensor  # (B, L) int64 or bool, on the device
    rows: torch.Tensor  # (N,) int64 flat indices of the non-pad positions of this rank's rows `local`, on the device
    local: slice = field(default_factory=lambda: slice(None))  # this rank's rows of the batch (all: 1 process)
    share: float = 1.0  # this rank's non-pad positions / the batch's (0 for a stand-in row, `Shard.rows`)


@dataclass
class RowShares:
    """A rank's share of the global batch's rows by kind; a term's local mean × its share sums over ranks to the
    global mean (1 and 1 in a 1-process run). Floats are known on the host; a tensor is a 0-dim device fp32."""

    rows: float = 1.0  # non-pad rows (KD and cosine rows)
    masked: float | torch.Tensor = 1.0  # masked rows (MLM; KD too with kd_masked_only)


def device_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device, shard: Shard | None = None
) -> DeviceBatch:
    """A CPU batch on the device with the non-pad row indices of `shard`'s rows (computed on the host: no device sync).

    The whole batch goes to the device (masking draws over all of it); `rows` index the rank's slice `local`.
    """
    local, share = slice(None), 1.0
    if shard is not None and shard.world > 1:
        local, real = shard.rows(input_ids.shape[0])
        total = int(attention_mask.sum())
        share = int(attention_mask[local].sum()) / max(total, 1) if real else 0.0
    rows = attention_mask[local].reshape(-1).nonzero().squeeze(1)  # CPU tensor
    moved = to_device({"input_ids": input_ids, "attention_mask": attention_mask, "rows": rows}, device)
    return DeviceBatch(**moved, local=local, share=share)


def _option(name: str, cli: bool, value=None) -> str:
    """Option `name` (and a value) as the caller spells it: `--alpha-cos 0` on the command line, `alpha_cos=0` in
    Python (`engine.hf`)."""
    if cli:
        return f"--{name.replace('_', '-')}" + ("" if value is None else f" {value}")
    return name + ("" if value is None else f"={value}")


def check_objective_options(opts: ObjectiveOptions, masking=None, cli: bool = True) -> None:
    """The pretraining loss's weights, temperature and masking fractions; a clear error names the option.

    A negative weight is refused, not taken as "off": --alpha-ce -1 would turn KD off without a word, and a negative
    MLM weight alone leaves a loss with no gradient. `cli`: the error names the flag (`--alpha-ce`), else the keyword
    argument (`alpha_ce`, `engine.hf`).
    """
    if not (math.isfinite(opts.temperature) and opts.temperature > 0):
        raise ValueError(f"{_option('temperature', cli)} must be > 0, got {opts.temperature}")
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos"):
        value = getattr(opts, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{_option(name, cli)} must be ≥ 0 (0 switches the term off), got {value}")
    if opts.kd_weight == opts.alpha_mlm == opts.alpha_cos == 0:
        raise ValueError("every loss term is switched off (alpha_ce = alpha_mlm = alpha_cos = 0)")
    if masking is not None and masking.mask_replace + masking.random_replace > 1:
        raise ValueError(
            f"--mask-replace {masking.mask_replace} + --random-replace {masking.random_replace} exceed 1: they are "
            "shares of the same chosen tokens"
        )


def check_cosine_widths(student_hidden: int, teacher_hidden: int, opts: ObjectiveOptions, cli: bool = True) -> None:
    """The cosine term compares hidden states row by row, so it needs a student of the teacher's width."""
    if opts.alpha_cos > 0 and student_hidden != teacher_hidden:
        raise ValueError(
            f"the cosine loss needs equal hidden sizes, but the student has {student_hidden} and the teacher "
            f"{teacher_hidden}; pass {_option('alpha_cos', cli, 0)} or use a student of the teacher's width"
        )


class PretrainObjective:
    """The DistilBERT triple loss for one micro-batch (masking included).

    Args:
        teacher, student: `engine.model.MaskedLM`; the teacher is frozen, in eval mode.
        special_ids: (S,) int64 ids never masked; mask_id: the [MASK] id.
        token_weights: (V,) fp32 masking weights for `mlm_smoothing`, or None.
        generator: the masking generator (on the batch's device), checkpointed by the loop.
    """

    def __init__(
        self, teacher, student, opts: ObjectiveOptions, masking, special_ids, mask_id, token_weights, generator
    ):
        check_objective_options(opts, masking)
        if (opts.kd_weight > 0 or opts.alpha_cos > 0) and teacher is None:
            raise ValueError("alpha_ce and alpha_cos need a teacher")
        h_s = student.config.hidden_size
        check_cosine_widths(h_s, teacher.config.hidden_size if teacher is not None else h_s, opts)
        self.teacher, self.student, self.opts, self.masking = teacher, student, opts, masking
        self.special_ids, self.mask_id, self.token_weights, self.generator = (
            special_ids,
            mask_id,
            token_weights,
            generator,
        )

    def mask(self, batch: DeviceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.masking
        return mask_tokens(
            batch.input_ids,
            batch.attention_mask,
            self.special_ids,
            self.mask_id,
            self.student.config.vocab_size,
            mlm_probability=m.mlm_probability,
            mask_replace=m.mask_replace,
            random_replace=m.random_replace,
            token_weights=self.token_weights,
            generator=self.generator,
        )

    def __call__(self, batch: DeviceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.opts
        input_ids, labels = self.mask(batch)  # the whole batch: every rank draws what a 1-process run draws
        shares = RowShares()
        attention_mask = batch.attention_mask
        if batch.local != slice(None):  # this rank's rows, and its shares of the global counts
            all_masked = (labels != -100).sum()
            input_ids, labels, attention_mask = input_ids[batch.local], labels[batch.local], attention_mask[batch.local]
            masked = (labels != -100).sum() / all_masked.clamp_min(1) if batch.share > 0 else 0.0
            shares = RowShares(rows=batch.share, masked=masked)
        teacher = self.teacher
        return pretrain_loss(
            lambda: self.student.encoder(input_ids, attention_mask).last_hidden_state,
            lambda: teacher.encoder(input_ids, attention_mask).last_hidden_state,
            batch.rows, labels, self.student.lm_head, teacher.lm_head if teacher is not None else None, o, shares,
        )  # fmt: skip


def pretrain_loss(
    student_hidden, teacher_hidden, rows, labels, student_head, teacher_head, o: ObjectiveOptions,
    shares: RowShares | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """The triple loss of one batch from its models' last hidden states: the rows are packed once, then `triple_loss`.

    The one place that says which model runs when: the teacher first, under no_grad and only when a KD or cosine term
    needs it, then the student. `PretrainObjective` and `engine.hf` (MLM) call it with their own models.

    Args:
        student_hidden: () → (B, L, H) the student's last hidden states (called with grad).
        teacher_hidden: () → (B, L, H_t) the teacher's.
        rows: (N,) int64 flat indices of the KD/cosine rows (the non-pad positions) in the (B·L) positions.
        labels: (B, L) int64 MLM labels, −100 where a position is not masked.
        student_head, teacher_head, o, shares: as `triple_loss` takes them (teacher_head None: no teacher).
    Returns:
        `triple_loss`'s (loss () fp32, {"kd", "mlm", "cos"}).
    """
    need_teacher = o.kd_weight > 0 or o.alpha_cos > 0
    t_rows = None
    if need_teacher:
        with torch.no_grad():
            t_rows = teacher_hidden().flatten(0, 1).index_select(0, rows)  # (N, H_t)
    s_rows = student_hidden().flatten(0, 1).index_select(0, rows)  # (N, H)
    row_labels = labels.reshape(-1).index_select(0, rows)  # (N,)
    return triple_loss(s_rows, t_rows, row_labels, student_head, teacher_head, o, shares)


def triple_loss(
    s_rows, t_rows, labels, student_head, teacher_head, o: ObjectiveOptions, shares: RowShares | None = None
):
    """α_ce·KD(T) + α_mlm·MLM + α_cos·(1 − cos) on packed rows; the MLM head is fused into the KD+CE kernel.

    Args:
        s_rows: (N, H) student last hidden states of the KD/cosine rows (requires grad).
        t_rows: (N, H_t) teacher last hidden states of the same rows, or None (MLM alone).
        labels: (N,) int64 MLM labels of those rows, −100 where a row is not masked.
        student_head, teacher_head: MLM heads: `.transform(h)` (dense → act → LayerNorm) and `.decoder` (a Linear
            over the vocabulary: `.weight` (V, H), `.bias` (V,) or None). The teacher's runs under no_grad.
        o: the weights, temperature and row options.
        shares: this rank's shares of the global row counts (None: the rows are the whole batch); each term is
            its mean over these rows × its share, so that the ranks' losses and terms sum to the global ones.
    Returns:
        (loss () fp32, {"kd", "mlm", "cos": () fp32 unweighted terms (× their shares), detached}).
    """
    shares = shares or RowShares()
    kd_share = shares.masked if o.kd_masked_only else shares.rows
    zero = s_rows.new_zeros((), dtype=torch.float32)
    terms = {"kd": zero, "mlm": zero, "cos": zero}
    loss = zero
    if o.kd_weight > 0 or o.alpha_mlm > 0:
        head = student_head
        hs, ht, y = s_rows, (t_rows if o.kd_weight > 0 else None), labels
        if o.kd_masked_only or o.kd_weight == 0:
            # Only the masked rows need the head: pack them (15% of the rows, so the vocabulary
            # projections cost ~85% less) at the price of one device→host read of their count.
            sel = (labels != -100).nonzero().squeeze(1)
            hs, y = hs.index_select(0, sel), y.index_select(0, sel)  # (M, H), (M,)
            ht = ht.index_select(0, sel) if ht is not None else None  # (M, H_t)
        z_s = head.transform(hs)  # (N or M, H)
        if o.kd_weight > 0:
            t_head = teacher_head
            with torch.no_grad():
                z_t = t_head.transform(ht)  # (N or M, H_t)
            labels_or_none = y if o.alpha_mlm > 0 else None
            if o.fused_head:
                out = fused_linear_distill_loss(
                    z_s, head.decoder.weight, head.decoder.bias, z_t, t_head.decoder.weight, t_head.decoder.bias,
                    labels=labels_or_none, temperature=o.temperature, kd_weight=o.kd_weight * kd_share,
                    ce_weight=o.alpha_mlm * shares.masked,
                )  # fmt: skip
            else:
                s_logits = torch.nn.functional.linear(z_s, head.decoder.weight, head.decoder.bias)  # (N, V)
                with torch.no_grad():
                    t_logits = torch.nn.functional.linear(z_t, t_head.decoder.weight, t_head.decoder.bias)
                out = distill_loss(
                    s_logits, t_logits, labels=labels_or_none, temperature=o.temperature,
                    kd_weight=o.kd_weight * kd_share, ce_weight=o.alpha_mlm * shares.masked,
                )  # fmt: skip
            loss = loss + out.loss
            terms["kd"] = out.kd.detach() * kd_share
            terms["mlm"] = out.ce.detach() * shares.masked
        else:
            if o.fused_head:
                ce = fused_linear_cross_entropy(z_s, head.decoder.weight, head.decoder.bias, y)
            else:
                ce = cross_entropy(torch.nn.functional.linear(z_s, head.decoder.weight, head.decoder.bias), y)
            loss = loss + o.alpha_mlm * shares.masked * ce
            terms["mlm"] = ce.detach() * shares.masked
    if o.alpha_cos > 0:
        cos = cosine_loss(s_rows, t_rows.to(s_rows.dtype))
        loss = loss + o.alpha_cos * shares.rows * cos
        terms["cos"] = cos.detach() * shares.rows
    return loss, terms


def classification_kd_loss(
    student_logits, teacher_logits, labels, alpha: float, temperature: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """α·CE(s, y) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T)) averaged over the batch; one kernel pass.

    Returns (loss, {"kd", "ce"}) like `qa_kd_loss`: the unweighted batch means, detached, for logging. The teacher
    may be `SparseTargets` (a teacher cache): the same loss on the top-K + tail formula, exact when K = C.
    """
    out = _kd_ce(student_logits, teacher_logits, labels, temperature, 1 - alpha, alpha)
    return out.loss, {"kd": out.kd, "ce": out.ce}


def _kd_ce(student_logits, teacher, labels, temperature: float, kd_weight, ce_weight):
    """The one KD+CE kernel call of the task losses: dense teacher logits, or a teacher cache's `SparseTargets`."""
    if isinstance(teacher, SparseTargets):
        return sparse_distill_loss(student_logits, *teacher, labels=labels, temperature=temperature,
                                   kd_weight=kd_weight, ce_weight=ce_weight)  # fmt: skip
    return distill_loss(student_logits, teacher, labels=labels, temperature=temperature, kd_weight=kd_weight,
                        ce_weight=ce_weight)  # fmt: skip


def qa_kd_loss(
    student_start, student_end, teacher_start, teacher_end, start_positions, end_positions, attention_mask,
    alpha_qa: float, alpha_ce: float, temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """(DistilBERT)² QA distillation: α_qa·½(CE_start + CE_end) + α_ce·½(KD_start + KD_end).

    The logits are (B, L) over positions; KD excludes pad positions by setting both models' pad
    logits to −inf (the kernels treat −inf teacher entries as probability 0).
    """
    pad = ~attention_mask.bool()
    neg_inf = torch.finfo(torch.float32).min

    def one(s, t, y):
        s = s.float().masked_fill(pad, neg_inf)
        if not isinstance(t, SparseTargets):  # a teacher cache's targets hold −inf at pads already
            t = t.float().masked_fill(pad, neg_inf)
        return _kd_ce(s, t, y, temperature, alpha_ce / 2, alpha_qa / 2)

    a, b = one(student_start, teacher_start, start_positions), one(student_end, teacher_end, end_positions)
    return a.loss + b.loss, {"kd": (a.kd + b.kd) / 2, "ce": (a.ce + b.ce) / 2}


def qa_ce_loss(start_logits, end_logits, start_positions, end_positions, attention_mask) -> torch.Tensor:
    """½(CE_start + CE_end) over positions, pad positions excluded (their logits set to the fp32 minimum).

    Args:
        start_logits, end_logits: (B, L) float logits; start_positions, end_positions: (B,) int64 in [0, L);
        attention_mask: (B, L) 0/1.
    Returns:
        () fp32 loss.
    """
    pad = ~attention_mask.bool()
    lo = torch.finfo(torch.float32).min
    start = cross_entropy(start_logits.float().masked_fill(pad, lo), start_positions)
    end = cross_entropy(end_logits.float().masked_fill(pad, lo), end_positions)
    return (start + end) / 2


def check_kd_options(task: str, kd: KDOptions) -> None:
    """Weights and temperature a task's KD loss accepts; a clear error names the flag."""
    if not (math.isfinite(kd.temperature) and kd.temperature > 0):
        raise ValueError(f"--temperature must be > 0, got {kd.temperature}")
    if task == "classification" and not 0.0 <= kd.alpha <= 1.0:
        raise ValueError(f"--alpha must lie in [0, 1], got {kd.alpha}")
    if task == "qa" and (kd.alpha_ce < 0 or kd.alpha_qa < 0 or kd.alpha_ce == kd.alpha_qa == 0):
        raise ValueError(f"--alpha-ce and --alpha-qa must be ≥ 0, not both 0; got {kd.alpha_ce}, {kd.alpha_qa}")


def task_loss(task: str, student_out, teacher_out, batch: dict, kd: KDOptions | None):
    """One micro-batch's task loss from model outputs: fine-tuning when `teacher_out` is None, else distillation.

    Args:
        task: "classification" (outputs with `.logits` (B, C)) or "qa" (`.start_logits`, `.end_logits` (B, L)).
        batch: the device batch: "labels" (B,), or "start_positions"/"end_positions" (B,) and "attention_mask".
    Returns:
        (loss () fp32, {"ce", and "kd" with a teacher: () fp32 detached}).
    """
    s, t = student_out, teacher_out
    if task == "classification":
        if t is None:
            ce = cross_entropy(s.logits, batch["labels"])  # (B, C) → ()
            return ce, {"ce": ce.detach()}
        return classification_kd_loss(s.logits, t.logits, batch["labels"], kd.alpha, kd.temperature)
    sp, ep, mask = batch["start_positions"], batch["end_positions"], batch["attention_mask"]
    if t is None:
        ce = qa_ce_loss(s.start_logits, s.end_logits, sp, ep, mask)
        return ce, {"ce": ce.detach()}
    return qa_kd_loss(
        s.start_logits, s.end_logits, t.start_logits, t.end_logits, sp, ep, mask,
        alpha_qa=kd.alpha_qa, alpha_ce=kd.alpha_ce, temperature=kd.temperature,
    )  # fmt: skip


class TaskLoss:
    """One micro-batch's loss for `distill finetune` (no teacher) and `distill task` (a frozen teacher).

    Args:
        task: "classification" or "qa".
        student: SequenceClassifier or QuestionAnswerer being trained.
        teacher: the same head type, frozen in eval mode, or None (plain fine-tuning); or a teacher cache
            (`engine.teacher_cache.TaskTeacherCache`: CPU batch → the stored targets of its rows, no teacher model).
        kd: the weights and temperature (with a teacher).
        device: where the batch goes.
        shard: this rank's rows of every (global) batch; None: all of them. Every term is a mean over the batch's
            examples, so a rank's loss and terms are its local means × (its rows / the batch's rows).
    Call: CPU batch dict → (loss () fp32, {"ce", and "kd" with a teacher: () fp32 detached}).
    """

    def __init__(self, task: str, student, teacher=None, kd: KDOptions | None = None, device=None,
                 shard: Shard | None = None):  # fmt: skip
        self.task, self.student, self.teacher, self.kd, self.shard = task, student, teacher, kd, shard
        self.device = torch.device("cpu") if device is None else device
        if teacher is not None:
            if kd is None:
                raise ValueError("distillation needs KDOptions")
            check_kd_options(task, kd)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        share = 1.0
        if self.shard is not None and self.shard.world > 1:
            n = len(batch["input_ids"])
            local, real = self.shard.rows(n)
            share = (local.stop - local.start) / n if real else 0.0
            batch = {k: v[local] if isinstance(v, torch.Tensor) and v.dim() and len(v) == n else v
                     for k, v in batch.items()}  # fmt: skip
        b = to_device(batch, self.device)
        ids, mask, types = b["input_ids"], b["attention_mask"], b.get("token_type_ids")
        s = self.student(ids, mask, types)
        t = None
        if hasattr(self.teacher, "targets_for"):  # a teacher cache: looked up by the CPU batch's example indices
            t = self.teacher.targets_for(batch, self.device)
        elif self.teacher is not None:
            with torch.no_grad():
                t = self.teacher(ids, mask, types)
        loss, terms = task_loss(self.task, s, t, b, self.kd)
        if share != 1.0:
            loss, terms = loss * share, {k: v * share for k, v in terms.items()}
        return loss, terms

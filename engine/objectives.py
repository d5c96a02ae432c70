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
"""

from dataclasses import dataclass

import torch

from engine.batching import to_device
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
    input_ids: torch.Tensor  # (B, L) int64, on the device
    attention_mask: torch.Tensor  # (B, L) int64 or bool, on the device
    rows: torch.Tensor  # (N,) int64 flat indices of the non-pad positions, on the device


def device_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, device: torch.device) -> DeviceBatch:
    """A CPU batch on the device together with its non-pad row indices (computed on the host: no device sync)."""
    rows = attention_mask.reshape(-1).nonzero().squeeze(1)  # CPU tensor
    return DeviceBatch(**to_device({"input_ids": input_ids, "attention_mask": attention_mask, "rows": rows}, device))


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
        if opts.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {opts.temperature}")
        if opts.kd_weight == opts.alpha_mlm == opts.alpha_cos == 0:
            raise ValueError("every loss term is switched off (alpha_ce = alpha_mlm = alpha_cos = 0)")
        if (opts.kd_weight > 0 or opts.alpha_cos > 0) and teacher is None:
            raise ValueError("alpha_ce and alpha_cos need a teacher")
        h_s = student.config.hidden_size
        h_t = teacher.config.hidden_size if teacher is not None else h_s
        if opts.alpha_cos > 0 and h_s != h_t:
            raise ValueError(
                f"the cosine loss needs equal hidden sizes, but the student has {h_s} and the teacher {h_t}; "
                "pass --alpha-cos 0 or use a student of the teacher's width"
            )
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
        input_ids, labels = self.mask(batch)
        need_teacher = o.kd_weight > 0 or o.alpha_cos > 0
        if need_teacher:
            with torch.no_grad():
                t_hidden = self.teacher.encoder(input_ids, batch.attention_mask).last_hidden_state  # (B, L, H_t)
                t_rows = t_hidden.flatten(0, 1).index_select(0, batch.rows)  # (N, H_t)
        s_hidden = self.student.encoder(input_ids, batch.attention_mask).last_hidden_state  # (B, L, H)
        s_rows = s_hidden.flatten(0, 1).index_select(0, batch.rows)  # (N, H)
        row_labels = labels.reshape(-1).index_select(0, batch.rows)  # (N,)
        t_head = self.teacher.lm_head if self.teacher is not None else None
        return triple_loss(s_rows, t_rows if need_teacher else None, row_labels, self.student.lm_head, t_head, o)


def triple_loss(s_rows, t_rows, labels, student_head, teacher_head, o: ObjectiveOptions):
    """α_ce·KD(T) + α_mlm·MLM + α_cos·(1 − cos) on packed rows; the MLM head is fused into the KD+CE kernel.

    Args:
        s_rows: (N, H) student last hidden states of the KD/cosine rows (requires grad).
        t_rows: (N, H_t) teacher last hidden states of the same rows, or None (MLM alone).
        labels: (N,) int64 MLM labels of those rows, −100 where a row is not masked.
        student_head, teacher_head: MLM heads: `.transform(h)` (dense → act → LayerNorm) and `.decoder` (a Linear
            over the vocabulary: `.weight` (V, H), `.bias` (V,) or None). The teacher's runs under no_grad.
        o: the weights, temperature and row options.
    Returns:
        (loss () fp32, {"kd", "mlm", "cos": () fp32 unweighted terms, detached}).
    """
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
                    labels=labels_or_none, temperature=o.temperature, kd_weight=o.kd_weight, ce_weight=o.alpha_mlm,
                )  # fmt: skip
            else:
                s_logits = torch.nn.functional.linear(z_s, head.decoder.weight, head.decoder.bias)  # (N, V)
                with torch.no_grad():
                    t_logits = torch.nn.functional.linear(z_t, t_head.decoder.weight, t_head.decoder.bias)
                out = distill_loss(
                    s_logits, t_logits, labels=labels_or_none, temperature=o.temperature,
                    kd_weight=o.kd_weight, ce_weight=o.alpha_mlm,
                )  # fmt: skip
            loss = loss + out.loss
            terms["kd"] = out.kd.detach()
            terms["mlm"] = out.ce.detach()
        else:
            if o.fused_head:
                ce = fused_linear_cross_entropy(z_s, head.decoder.weight, head.decoder.bias, y)
            else:
                ce = cross_entropy(torch.nn.functional.linear(z_s, head.decoder.weight, head.decoder.bias), y)
            loss = loss + o.alpha_mlm * ce
            terms["mlm"] = ce.detach()
    if o.alpha_cos > 0:
        cos = cosine_loss(s_rows, t_rows.to(s_rows.dtype))
        loss = loss + o.alpha_cos * cos
        terms["cos"] = cos.detach()
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
    if not kd.temperature > 0:
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
        teacher: the same head type, frozen in eval mode, or None (plain fine-tuning).
        kd: the weights and temperature (with a teacher).
        device: where the batch goes.
    Call: CPU batch dict → (loss () fp32, {"ce", and "kd" with a teacher: () fp32 detached}).
    """

    def __init__(self, task: str, student, teacher=None, kd: KDOptions | None = None, device=None):
        self.task, self.student, self.teacher, self.kd = task, student, teacher, kd
        self.device = torch.device("cpu") if device is None else device
        if teacher is not None:
            if kd is None:
                raise ValueError("distillation needs KDOptions")
            check_kd_options(task, kd)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = to_device(batch, self.device)
        ids, mask, types = b["input_ids"], b["attention_mask"], b.get("token_type_ids")
        s = self.student(ids, mask, types)
        t = None
        if hasattr(self.teacher, "targets_for"):  # a teacher cache: looked up by the CPU batch's example indices
            t = self.teacher.targets_for(batch, self.device)
        elif self.teacher is not None:
            with torch.no_grad():
                t = self.teacher(ids, mask, types)
        return task_loss(self.task, s, t, b, self.kd)

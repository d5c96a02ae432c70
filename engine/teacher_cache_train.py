"""Training from a teacher cache: the adapters that put a cache where the live teacher was.

distill task --teacher-cache       `engine.objectives.TaskLoss` takes a `TaskTeacherCache` (the store's reader)
                                   as its teacher
distill pretrain --teacher-cache   `pretrain_from_cache`: `cached_batches` (the stored masked copies, epoch mod C)
                                   and `CachedPretrainObjective` (`cached_triple_loss`: the triple loss against
                                   the stored top-K + tail targets and hidden states)

Many processes (`engine.distributed`), as the live teacher's pretraining: every rank plans the same global batch and
keeps its rows `Shard.rows`, but reads only their masked copies and teacher rows from the (memory-mapped) cache, into
a `CachedSlice` padded to the global batch's width. Its `RowShares` (local / global non-pad and masked counts) come
from the sequence lengths and the stored masks of the whole batch (one byte per token, no teacher rows), so each term
is its local mean × its share and the ranks' losses sum to the 1-process loss without a collective.
"""

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from engine import distributed
from engine.atomic import write_json
from engine.distributed import Shard
from engine.objectives import RowShares
from engine.teacher_cache_store import CachedBatch, MLMTeacherCache, TrainSequences
from kernels import cosine_loss, cross_entropy, sparse_distill_loss


def cached_triple_loss(
    s_rows, labels, b: CachedBatch, head, o, shares: RowShares | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DistilBERT's triple loss (`engine.objectives.triple_loss`) against a teacher cache on packed rows: the KD term
    on the stored top-K + tail targets (`kernels.sparse_distill_loss`, with the MLM CE in the same pass), the cosine
    term on stored hidden states. The student's vocabulary projection is materialized for the KD rows ([R, V]: the
    fused head takes a teacher's hidden states, which a top-K cache does not hold).

    Args: s_rows (N, H) student hidden states of the non-pad rows; labels (N,) their MLM labels (−100: not masked);
    b the batch (on the device); head the student's MLM head; o the ObjectiveOptions; shares this rank's shares of
    the global batch's rows (None: the rows are the whole batch), applied as `triple_loss` applies them.
    Returns: (loss () fp32, {"kd", "mlm", "cos": () fp32 unweighted terms × their shares, detached}).
    """
    shares = shares or RowShares()
    kd_share = shares.masked if o.kd_masked_only else shares.rows  # the KD rows: the masked ones, or all non-pad
    zero = s_rows.new_zeros((), dtype=torch.float32)
    terms = {"kd": zero, "mlm": zero, "cos": zero}
    loss = zero
    if o.kd_weight > 0 or o.alpha_mlm > 0:
        sel = b.kd_rows if o.kd_weight > 0 else b.masked_rows
        z = head.transform(s_rows.index_select(0, sel))  # (R, H)
        logits = torch.nn.functional.linear(z, head.decoder.weight, head.decoder.bias)  # (R, V)
        y = labels.index_select(0, sel)
        if o.kd_weight > 0:
            y_ce = y if o.alpha_mlm > 0 else None
            out = sparse_distill_loss(logits, b.values, b.indices, b.lse, labels=y_ce, temperature=o.temperature,
                                      kd_weight=o.kd_weight * kd_share,
                                      ce_weight=o.alpha_mlm * shares.masked)  # fmt: skip
            loss = loss + out.loss
            terms["kd"], terms["mlm"] = out.kd.detach() * kd_share, out.ce.detach() * shares.masked
        else:
            ce = cross_entropy(logits, y)
            loss = loss + o.alpha_mlm * shares.masked * ce
            terms["mlm"] = ce.detach() * shares.masked
    if o.alpha_cos > 0:
        cos = cosine_loss(s_rows, b.hidden.to(s_rows.dtype))
        loss = loss + o.alpha_cos * shares.rows * cos
        terms["cos"] = cos.detach() * shares.rows
    return loss, terms


@dataclass
class CachedSlice(CachedBatch):
    """A rank's rows of a global pretraining batch from the cache (all of them in 1 process), padded to the global
    batch's width as the live path's slice of its device batch is, with the rank's shares of the global counts."""

    shares: RowShares = field(default_factory=RowShares)  # local / global non-pad and masked rows (1, 1 alone)
    tokens: int = 0  # the global batch's non-pad tokens (tokens/s counts the global batch, as the live path does)


def cached_slice(cache: MLMTeacherCache, seq_ids: list[int], lengths: list[int], copy: int, pad_id: int,
                 multiple_of: int, shard: Shard) -> CachedSlice:  # fmt: skip
    """`shard`'s rows of the global batch of training sequences `seq_ids` (lengths `lengths`), masked copy `copy`.

    Only the rank's rows are read from the cache, besides one byte per token of the others' masks (their count).
    A batch with fewer rows than ranks leaves a rank row 0 as a stand-in of share 0 (`Shard.rows`): every rank still
    runs the step and its collectives, and adds nothing.
    """
    local, real = shard.rows(len(seq_ids))
    width = -(-max(lengths) // multiple_of) * multiple_of  # the global batch's padded length (`pad_to_multiple`)
    # multiple_of=width pads the rank's rows (none longer than the batch's longest) to exactly the global width.
    b = cache.batch(seq_ids[local], copy, pad_id, multiple_of=width)
    shares = RowShares()
    if shard.world > 1:
        masked = cache.masked_counts(seq_ids, copy)
        rows_share = sum(lengths[local]) / max(sum(lengths), 1)
        masked_share = sum(masked[local]) / max(sum(masked), 1)
        shares = RowShares(rows=rows_share, masked=masked_share) if real else RowShares(rows=0.0, masked=0.0)
    return CachedSlice(**{f.name: getattr(b, f.name) for f in fields(CachedBatch)}, shares=shares, tokens=sum(lengths))


class CachedPretrainObjective:
    """`engine.objectives.PretrainObjective` with a teacher cache in place of the teacher (and of dynamic masking)."""

    def __init__(self, student, opts, device):
        from engine.objectives import check_objective_options

        check_objective_options(opts)
        self.student, self.opts, self.device = student, opts, device

    def __call__(self, batch: CachedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch: a `CachedSlice` (a rank's rows and shares) or a whole `CachedBatch` → (loss, {"kd", "mlm", "cos"})."""
        from engine.batching import to_device

        b = to_device(batch, self.device)
        h = self.student.encoder(b.input_ids, b.attention_mask).last_hidden_state  # (B, L, H)
        s_rows = h.flatten(0, 1).index_select(0, b.rows)  # (N, H)
        labels = b.labels.reshape(-1).index_select(0, b.rows)  # (N,)
        shares = b.shares if isinstance(b, CachedSlice) else None
        return cached_triple_loss(s_rows, labels, b, self.student.lm_head, self.opts, shares)


def cached_batches(batches, cache: MLMTeacherCache, shard: Shard | None = None):
    """The training batches `batches` (`engine.batching.LengthGroupedBatches` over the split) with `CachedSlice`s
    of the cache's masked copy (epoch mod copies) in place of fresh ones: the same order, resumable the same way.
    `shard`: the rank's rows of each global batch (None: all of them, one process)."""
    shard = shard or Shard()

    class CachedCorpusBatches(type(batches)):
        def _collate(self, idx: torch.Tensor) -> CachedSlice:  # idx: positions in the training split
            lengths = self._lengths[idx].tolist()
            return cached_slice(cache, idx.tolist(), lengths, self.epoch % cache.copies, self.pad_id,
                                self.pad_to_multiple, shard)  # fmt: skip

    out = CachedCorpusBatches.__new__(CachedCorpusBatches)
    out.__dict__.update(batches.__dict__)
    return out


# ---- the command -----------------------------------------------------------------------------------------------------


def pretrain_from_cache(model_opts, data, masking, objective, optim, run) -> dict:
    """`distill pretrain --teacher-cache`: the DistilBERT triple loss against a pretraining cache, no teacher in
    memory; masking is the cache's (static, `mask_copies` fixed copies cycled through by epoch), and the report says
    so. Called by `engine.pretrain.pretrain` (inside its run-folder guard) with the same options."""
    from engine import checkpoint as ckpt
    from engine.config import ModelConfig
    from engine.corpus import find_sources, load_tokenizer
    from engine.evaluate import evaluate_mlm
    from engine.loop import train
    from engine.model import count_parameters
    from engine.objectives import check_objective_options
    from engine.options import check_ranges, to_dict
    from engine.pretrain import LOSS_KEYS, prepare_corpus
    from engine.report import format_table
    from engine.runs import (
        check_lengths,
        check_out_dir,
        describe,
        interrupted,
        loss_summary,
        prepare_out_dir,
        release_replaced,
        save_model,
        setup,
        skip_input_checks,
        student_checkpoint,
    )

    device, precision = setup(run)
    if not data.data:
        raise ValueError("--data is required: the texts the cache was made from")
    check_ranges(data, masking, objective, optim, run)
    distributed.check_batch_size(data.batch_size)
    check_objective_options(objective, masking)
    cache = MLMTeacherCache(model_opts.teacher_cache)
    m = cache.manifest
    record = to_dict(model_opts, data, masking, objective, optim, run)
    check_out_dir(run, record)
    teacher_dir = Path(model_opts.teacher or cache.teacher_path)
    if not (teacher_dir / "config.json").is_file() and not model_opts.student:
        raise ValueError(
            f"the teacher the cache was made with ({teacher_dir}) is gone, and the student is made from its layers by "
            "default: give --student (or --teacher, the same checkpoint elsewhere)"
        )
    tokenizer = load_tokenizer(cache.tokenizer_dir)
    student_cfg = [ModelConfig.from_pretrained(model_opts.student)] if model_opts.student else []
    check_lengths(data.max_seq_len, tokenizer, cache.config, *student_cfg)
    find_sources(data.data, text_column=data.text_column)  # every file there and text, checked without reading it
    out = prepare_out_dir(run.out, run.resume, run.overwrite, record)
    student_dir = student_checkpoint(model_opts.student, teacher_dir, out, model_opts.student_arch,
                                     model_opts.student_num_layers, model_opts.student_layers)  # fmt: skip
    student = ckpt.load_model(student_dir, head="mlm", device=device)[0]
    if student.config.vocab_size != m["teacher"]["vocab_size"]:
        raise ValueError(
            f"vocabulary mismatch: the cache's teacher has {m['teacher']['vocab_size']} tokens, the student "
            f"{student.config.vocab_size}; the student must use the teacher's tokenizer"
        )
    corpus = prepare_corpus(tokenizer, data, masking, run, out, student.config.vocab_size, device)  # the token store
    cache.check(TrainSequences(corpus.batches), objective, tokenizer, model_opts.teacher or None)
    skip_input_checks(student)
    batches = cached_batches(corpus.batches, cache, distributed.shard())  # each rank reads its rows of every batch
    objective_fn = CachedPretrainObjective(student, objective, device)
    static = f"static masking: {m['mask_copies']} fixed masked copies per sequence from the teacher cache"
    print(
        f"teacher cache {cache.path} (K = {m['top_k']}, T = {m['temperature']:g}, {static}) -> student {student_dir} "
        f"({describe(student)}); {corpus.n_train} train / {corpus.n_heldout} held-out sequences; {device} {precision}"
    )
    mask_id = tokenizer.mask_token_id

    def evaluate(step):
        return evaluate_mlm({"student": student}, corpus.eval_batches, corpus.special_ids, mask_id, masking, device,
                            precision)  # fmt: skip

    t0 = time.perf_counter()
    resume = run.resume and (out / "checkpoint" / "trainer_state.pt").is_file()  # a start without one is afresh
    result = train(
        student, objective_fn, batches, optim, replace(run, resume=resume), out, device, precision,
        tokenizer_dir=cache.tokenizer_dir, evaluate=evaluate, tokens_in=lambda b: b.tokens,
        options_record=record, on_save=lambda step: release_replaced(out),
    )  # fmt: skip
    if result.interrupted:
        return interrupted(result.step, out)
    final = evaluate(result.step)
    save_model(student, out / "student", cache.tokenizer_dir)
    report = {
        "teacher": {"path": m["teacher"]["path"], "parameters": m["teacher"]["parameters"], "from_cache": True},
        "student": {"path": str(out / "student"), "parameters": count_parameters(student), **final["student"]},
        "teacher_cache": {"path": str(cache.path), "masking": static, "tail_mass_mean": m.get("tail_mass_mean"),
                          **{k: m[k] for k in ("top_k", "dense", "temperature", "mask_copies", "kd_rows", "hidden",
                                               "bytes", "bytes_per_token")}},
        "heldout_masked_tokens": final["masked_tokens"],
        "steps": result.step,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "device": str(device),
        "precision": precision,
        **loss_summary(out / "metrics.jsonl", out / "loss_curve.png", LOSS_KEYS),
    }  # fmt: skip
    distributed.run_on_main(lambda: write_json(out / "report.json", report), share_result=False)
    s = report["student"]
    row = ("student", f"{s['parameters'] / 1e6:.1f}M", f"{100 * s['mlm_accuracy']:.2f}", f"{s['perplexity']:.2f}")
    print(format_table([row], ("model", "params", "held-out MLM acc %", "perplexity")))
    print(f"{static}; loss {report['first_loss']} -> {report['last_loss']} in {report['steps']} steps")
    print(f"report: {out / 'report.json'}")
    return report

"""Evaluation and inference speed, for every command.

- `evaluate_mlm`: held-out masked-token accuracy and perplexity on fixed masks; with a teacher and a student, their
  top-1 agreement and hidden-state cosine (`distill pretrain`, `distill adapt-head`).
- `evaluate_model`: validation accuracy and macro-F1 (classification) or SQuAD EM/F1 (QA) (`finetune`, `task`).
- `measure_speed`: batch-1 latency and full-batch throughput, models taking turns so a shared CPU slows all alike.
All run under `torch.no_grad()` in eval mode and restore each model's mode.
"""

import math
import statistics
import time

import torch

from engine.batching import pad_to_multiple, to_device
from engine.loop import autocast
from engine.masking import mask_tokens
from engine.metrics import accuracy, macro_f1, squad_evaluate
from engine.objectives import device_batch
from engine.options import MaskingOptions, TaskDataOptions
from engine.qa import postprocess
from engine.taskdata import EvalSet


@torch.no_grad()
def evaluate_mlm(models: dict, batches, special_ids, mask_id, masking: MaskingOptions, device, precision, seed=1234):
    """Held-out masked-token accuracy and perplexity of each model on fixed masks (the same at every
    evaluation); with two models (teacher, student) also their top-1 agreement on masked tokens and
    the mean cosine of their last hidden states on real tokens."""
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    vocab_size = next(iter(models.values())).config.vocab_size
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = dict.fromkeys(models, 0)
    nll = dict.fromkeys(models, 0.0)
    agree = cos_sum = 0.0
    n_masked = n_rows = 0
    for ids, attn in batches:
        b = device_batch(ids, attn, device)
        masked, labels = mask_tokens(
            b.input_ids, b.attention_mask, special_ids, mask_id, vocab_size,
            mlm_probability=masking.mlm_probability, mask_replace=masking.mask_replace,
            random_replace=masking.random_replace, generator=gen,
        )  # fmt: skip
        flat = labels.reshape(-1)
        sel = (flat != -100).nonzero().squeeze(1)
        y = flat[sel]
        preds, hidden = {}, {}
        with autocast(device, precision):
            for name, model in models.items():
                h = model.encoder(masked, b.attention_mask).last_hidden_state.flatten(0, 1)  # (B·L, H)
                hidden[name] = h.index_select(0, b.rows).float()  # (N, H)
                logits = model.lm_head(h[sel])
                logits = logits.float()  # (M, V)
                preds[name] = logits.argmax(-1)
                correct[name] += (preds[name] == y).sum().item()
                nll[name] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        if len(models) == 2:
            (p1, p2), (h1, h2) = preds.values(), hidden.values()
            agree += (p1 == p2).sum().item()
            cos_sum += torch.nn.functional.cosine_similarity(h1, h2, dim=-1).sum().item()
        n_masked += y.numel()
        n_rows += b.rows.numel()
    for name, m in models.items():
        m.train(modes[name])
    out = {
        name: {
            "mlm_accuracy": correct[name] / max(n_masked, 1),
            "perplexity": math.exp(min(nll[name] / max(n_masked, 1), 50.0)),
        }
        for name in models
    }
    if len(models) == 2:
        out["top1_agreement"] = agree / max(n_masked, 1)
        out["hidden_cosine"] = cos_sum / max(n_rows, 1)
    out["masked_tokens"] = n_masked
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict(model, batches: list[dict], device: torch.device, precision: str) -> tuple[list, float]:
    """Forward every batch in eval mode (the mode is restored after).

    Returns:
        (outputs, seconds): classification: one fp32 CPU (N, C) logits tensor; QA: (start rows, end rows), lists
        of F fp32 CPU rows of each window's padded length; seconds of forward passes, device synchronized.
    """
    was_training = model.training
    model.eval()
    outs = []
    _sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        b = to_device(batch, device)
        with autocast(device, precision):
            outs.append(model(b["input_ids"], b["attention_mask"], b.get("token_type_ids")))
    _sync(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if hasattr(outs[0], "logits"):
        return torch.cat([o.logits.float() for o in outs]).cpu(), seconds  # (N, C)
    start = [row for o in outs for row in o.start_logits.float().cpu()]
    end = [row for o in outs for row in o.end_logits.float().cpu()]
    return (start, end), seconds


def evaluate_model(model, eval_set: EvalSet, device, precision, data: TaskDataOptions) -> dict:
    """Validation scores: accuracy and macro-F1 (fractions in [0, 1]) for classification; SQuAD exact match and F1
    (percentages, the official normalization) for QA; plus the seconds the forward passes took."""
    out, seconds = predict(model, eval_set.batches, device, precision)
    timing = {"eval_seconds": round(seconds, 3)}
    if eval_set.labels is not None:
        preds = out.argmax(-1)
        return {
            "accuracy": accuracy(preds, eval_set.labels),
            "macro_f1": macro_f1(preds, eval_set.labels, out.shape[1]),
            **timing,
        }
    answers = postprocess(eval_set.examples, eval_set.features, *out, n_best=data.n_best,
                          max_answer_len=data.max_answer_len)  # fmt: skip
    return {**squad_evaluate(answers, eval_set.examples), **timing}


def single_example_batch(eval_set: EvalSet, pad_id: int) -> dict:
    """The first validation sequence alone, padded as in training (to a multiple of 8)."""
    first = eval_set.batches[0]
    n = int(first["attention_mask"][0].sum())
    ids, mask = pad_to_multiple([first["input_ids"][0, :n].tolist()], pad_id)
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in first:
        out["token_type_ids"], _ = pad_to_multiple([first["token_type_ids"][0, :n].tolist()], 0)
    return out


@torch.no_grad()
def measure_speed(models: dict, eval_set: EvalSet, pad_id: int, device: torch.device, precision: str,
                  iters: int = 10, warmup: int = 2, throughput_batches: int = 3) -> dict[str, dict]:  # fmt: skip
    """Inference speed of each model on the current device, in eval mode under autocast.

    Latency: median milliseconds of a forward pass on one sequence (batch 1), over `iters` passes. Throughput:
    sequences per second on full validation batches (`batch_size` sequences; QA: windows), the median over
    `throughput_batches` batches. Each pass follows `warmup` untimed ones, and the models take turns pass by pass,
    so that a machine whose load changes during the measurement (a shared CPU) slows them all alike.

    Returns:
        {name: {"latency_ms": float, "throughput": float}}, or {name: {}} when iters = 0.
    """
    if iters <= 0:
        return {name: {} for name in models}
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    one = to_device(single_example_batch(eval_set, pad_id), device)
    full = [to_device(b, device) for b in eval_set.batches[:throughput_batches]]
    full = [b for b in full if len(b["input_ids"]) == len(full[0]["input_ids"])] or full[:1]  # equal sizes only

    def timed(model, b) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device, precision):
            model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
        _sync(device)
        return time.perf_counter() - t0

    latency = {name: [] for name in models}
    rate = {name: [] for name in models}
    for i in range(warmup + iters):
        for name, m in models.items():
            dt = timed(m, one)
            if i >= warmup:
                latency[name].append(dt)
    for i in range(1 + len(full)):  # one untimed warm-up batch, then each batch once
        b = full[max(i - 1, 0)]
        for name, m in models.items():
            dt = timed(m, b)
            if i >= 1:
                rate[name].append(len(b["input_ids"]) / dt)
    for name, m in models.items():
        m.train(modes[name])
    return {
        name: {
            "latency_ms": round(1000 * statistics.median(latency[name]), 3),
            "throughput": round(statistics.median(rate[name]), 2),
        }
        for name in models
    }

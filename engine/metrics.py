"""Task metrics: classification accuracy and macro-F1, and the official SQuAD v1.1 evaluation.

Plain Python and PyTorch only (no scikit-learn). The SQuAD functions reproduce the official v1.1
evaluation script (`evaluate-v1.1.py`) term for term: answers are normalized (lower case, punctuation
removed, the articles a/an/the removed, whitespace collapsed); exact match compares normalized strings;
F1 is the bag-of-tokens overlap; each question scores the maximum over its gold answers; the totals are
percentages over all questions, unanswered ones scoring 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from engine.qa import QAExample

__all__ = ["accuracy", "exact_match", "f1", "macro_f1", "normalize_answer", "squad_evaluate"]


def _as_int_tensor(values: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    """Flatten ints (a sequence or a tensor of any shape) into a 1-D int64 CPU tensor."""
    t = torch.as_tensor(values).detach().cpu().reshape(-1)
    # An empty list becomes a float32 tensor: only non-empty float input is a caller error.
    if t.numel() and (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}; take argmax(-1) of logits first")
    return t.long()


def _check_pair(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor):
    p, y = _as_int_tensor(preds, "preds"), _as_int_tensor(labels, "labels")
    if p.numel() != y.numel():
        raise ValueError(f"preds and labels differ in length: {p.numel()} vs {y.numel()}")
    if p.numel() == 0:
        raise ValueError("preds and labels are empty: there is nothing to score")
    return p, y


def accuracy(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of predictions equal to their labels.

    Args:
        preds: predicted class ids, int, N values (a list or a tensor of any shape, flattened).
        labels: gold class ids, int, N values.

    Returns:
        accuracy in [0, 1] (a Python float).
    """
    p, y = _check_pair(preds, labels)
    return (p == y).double().mean().item()


def macro_f1(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of the per-class F1 = 2·TP / (2·TP + FP + FN).

    The mean runs over the classes that occur in `labels` or `preds`; a class absent from both has no
    true positives, false positives or false negatives, so its F1 is 0/0 and it is left out. This is
    what `sklearn.metrics.f1_score(labels, preds, average="macro")` computes (it averages over the
    union of the labels it sees), so a validation split that happens to miss a rare class is not
    penalized for it.

    Args:
        preds: predicted class ids, int in [0, num_classes), N values.
        labels: gold class ids, int in [0, num_classes), N values.
        num_classes: number of classes C.

    Returns:
        macro-F1 in [0, 1] (a Python float).
    """
    p, y = _check_pair(preds, labels)
    for name, t in (("preds", p), ("labels", y)):
        if t.min() < 0 or t.max() >= num_classes:
            raise ValueError(f"{name} holds ids outside [0, {num_classes}): min {t.min().item()}, max {t.max().item()}")
    tp = torch.bincount(y[p == y], minlength=num_classes).double()  # (C,)
    pred_count = torch.bincount(p, minlength=num_classes).double()  # (C,) = TP + FP
    gold_count = torch.bincount(y, minlength=num_classes).double()  # (C,) = TP + FN
    denom = pred_count + gold_count  # 2·TP + FP + FN
    present = denom > 0
    return (2 * tp[present] / denom[present]).mean().item()


# --- SQuAD v1.1 (official evaluation script semantics) ---

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace.

    The order is the official script's: punctuation goes before articles, so "the-end" → "theend"
    keeps its "the", while "the end" → "end".
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalized strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1(prediction: str, ground_truth: str) -> float:
    """Token-overlap F1 of the normalized strings: 2·P·R / (P + R) over the bag of shared tokens.

    As in the official v1.1 script, no shared token (including both sides normalizing to empty)
    scores 0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_evaluate(predictions: Mapping[str, str], examples: Iterable[QAExample]) -> dict[str, float]:
    """Official SQuAD v1.1 scores of predicted answer texts against the examples' gold answers.

    Args:
        predictions: question id → predicted answer text (what `engine.qa.postprocess` returns).
            Questions missing from it score 0 (as in the official script); extra ids are ignored.
        examples: the QA examples (`engine.qa.QAExample`), each with one or more gold answers.

    Returns:
        {"exact_match": %, "f1": %}: means over questions, as percentages in [0, 100], each
        question scored by the best of its gold answers.
    """
    em_total = f1_total = 0.0
    count = 0
    for ex in examples:
        count += 1
        if ex.id not in predictions:
            continue
        golds = [text for text, _ in ex.answers]
        if not golds:
            raise ValueError(f"example {ex.id!r} has no gold answers; SQuAD v1.1 questions all have at least one")
        pred = predictions[ex.id]
        em_total += max(exact_match(pred, g) for g in golds)
        f1_total += max(f1(pred, g) for g in golds)
    if count == 0:
        raise ValueError("no examples to evaluate")
    return {"exact_match": 100.0 * em_total / count, "f1": 100.0 * f1_total / count}

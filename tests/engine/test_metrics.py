"""Classification metrics and the SQuAD v1.1 evaluation against hand-computed values."""

import pytest
import torch

from engine.metrics import accuracy, exact_match, f1, macro_f1, normalize_answer, squad_evaluate
from engine.qa import QAExample


def test_accuracy_lists_and_tensors():
    assert accuracy([0, 1, 2, 1], [0, 2, 2, 1]) == pytest.approx(0.75)
    assert accuracy(torch.tensor([[1, 1], [0, 0]]), torch.tensor([1, 0, 0, 0])) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "preds, labels, match",
    [([0, 1], [0], "differ in length"), ([], [], "empty"), ([0.5, 1.0], [0, 1], "integer class ids")],
)
def test_accuracy_rejects_bad_input(preds, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        accuracy(preds, labels)


def test_macro_f1_hand_computed():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: TP 1, FP 1, FN 1 → 2/4;  class 1: TP 2, FP 1, FN 0 → 4/5;  class 2: TP 1, FP 0, FN 1 → 2/3
    expected = (2 / 4 + 4 / 5 + 2 / 3) / 3
    assert macro_f1(preds, labels, num_classes=3) == pytest.approx(expected)
    # A class seen in neither preds nor labels has F1 = 0/0 and stays out of the mean (sklearn's choice).
    assert macro_f1(preds, labels, num_classes=5) == pytest.approx(expected)
    assert macro_f1(torch.tensor(labels), torch.tensor(labels), num_classes=3) == pytest.approx(1.0)


def test_macro_f1_counts_a_class_only_predicted():
    # class 1 only predicted: TP 0, FP 1, FN 0 → F1 0, and it counts in the mean.
    # class 0: TP 1, FP 0, FN 1 → 2/3.
    assert macro_f1([0, 1], [0, 0], num_classes=2) == pytest.approx((2 / 3 + 0.0) / 2)


def test_macro_f1_matches_sklearn_when_installed():
    metrics = pytest.importorskip("sklearn.metrics")  # not a dependency: checked only where present
    g = torch.Generator().manual_seed(0)
    preds, labels = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 4, (200,), generator=g)
    expected = metrics.f1_score(labels.numpy(), preds.numpy(), average="macro")
    assert macro_f1(preds, labels, num_classes=6) == pytest.approx(expected)


def test_macro_f1_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        macro_f1([0, 2], [0, 1], num_classes=2)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Denver Broncos", "denver broncos"),
        ("an apple, a pear!", "apple pear"),
        ("  Super   Bowl\t50. ", "super bowl 50"),
        ("theatre", "theatre"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so "the" is no longer a word of its own
        ("A", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a cat", "the  cat.") == 1.0
    assert exact_match("big cat", "cat") == 0.0


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        # "big cat" vs "cat": 1 shared token, P = 1/2, R = 1/1 → 2·(1/2)·1 / (3/2) = 2/3
        ("the big cat", "a cat", 2 / 3),
        # "denver broncos" vs "denver broncos team": P = 1, R = 2/3 → 0.8
        ("Denver Broncos", "the Denver Broncos team", 0.8),
        # bag overlap counts multiplicity: {cat, dog} shared once each, P = R = 2/3
        ("cat cat dog", "cat dog dog", 2 / 3),
        # "cat" shared twice: P = R = 2/3 (a set intersection would count it once: 1/3)
        ("cat cat dog", "cat cat bird", 2 / 3),
        ("Paris", "London", 0.0),
        ("the", "a", 0.0),  # both normalize to empty: 0 in v1.1
        ("Super Bowl 50!", "super bowl 50", 1.0),
    ],
)
def test_f1_hand_computed(pred, gold, expected):
    assert f1(pred, gold) == pytest.approx(expected)


def test_squad_evaluate_max_over_golds_and_missing_predictions():
    examples = [
        QAExample("q1", "?", "", [("Denver Broncos", 0), ("the Broncos", 0)]),
        QAExample("q2", "?", "", [("a cat", 0), ("cat", 0)]),
        QAExample("q3", "?", "", [("Paris", 0)]),
    ]
    preds = {"q1": "Broncos", "q2": "the big cat", "extra": "ignored"}  # q3 unanswered → 0
    # q1: EM 1 (vs "the Broncos"), F1 1.  q2: EM 0, F1 max(2/3, 2/3) = 2/3.  q3: 0, 0.
    scores = squad_evaluate(preds, examples)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert squad_evaluate({"q1": "Denver Broncos", "q2": "cat", "q3": "paris."}, examples) == {
        "exact_match": 100.0,
        "f1": 100.0,
    }


def test_squad_evaluate_rejects_no_examples():
    with pytest.raises(ValueError, match="no examples"):
        squad_evaluate({}, [])

"""Extractive QA: SQuAD loading, stride windows and their labels, span decoding, and bad input."""

import json

import pytest
import torch

from engine.metrics import squad_evaluate
from engine.qa import QAExample, load_squad, postprocess, prepare_features, qa_batches

FILLER = "the people of the town walked to the old market every day and spoke with friends about the weather"
ANSWER = "Golden Gate Bridge"

# Small windows so short contexts need several: 40 tokens, at most 8 of question, 3 special tokens
# → 29 context tokens per window, consecutive windows sharing 10.
MAX_LEN, STRIDE, MAX_QUERY = 40, 10, 8


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _squad_json(paragraphs):
    """paragraphs: [(context, [(id, question, [(text, start), ...]), ...]), ...] → SQuAD v1.1 dict."""
    return {
        "version": "1.1",
        "data": [
            {
                "title": "test",
                "paragraphs": [
                    {
                        "context": ctx,
                        "qas": [
                            {"id": qid, "question": q, "answers": [{"text": t, "answer_start": s} for t, s in answers]}
                            for qid, q, answers in qas
                        ],
                    }
                    for ctx, qas in paragraphs
                ],
            }
        ],
    }


def _paragraphs():
    """Contexts several windows long, with the answer slid across positions so some straddle a boundary."""
    words = FILLER.split()
    paragraphs = []
    for shift in range(40):
        before = " ".join((words * 3)[: shift + 5])
        context = f"{before} near the {ANSWER}, said {FILLER}. {FILLER} and again {FILLER}."
        start = context.index(ANSWER)
        paragraphs.append((context, [(f"slide-{shift}", "Which bridge was near the town?", [(ANSWER, start)])]))
    # The answer text also occurs earlier in the paragraph: answer_start names the later one.
    ctx = f"In 1990 the team won. {FILLER}. Later, in 1990 the city voted, and the mayor, Ann Lee, resigned."
    paragraphs.append(
        (
            ctx,
            [
                ("repeat", "When did the city vote?", [("1990", ctx.index("1990", 10))]),
                (
                    "mayor",
                    "Who was the mayor?",
                    [("Ann Lee", ctx.index("Ann Lee")), ("the mayor, Ann Lee", ctx.index("the mayor"))],
                ),
                ("first", "When did the team win?", [("1990", 3)]),
            ],
        )
    )
    long_q = "Which " + " ".join(["very"] * 30) + " long question asks about the market?"
    paragraphs.append((f"{FILLER} in Zurich.", [("long-question", long_q, [("Zurich", len(FILLER) + 4)])]))
    return paragraphs


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("squad") / "mini.json"
    path.write_text(json.dumps(_squad_json(_paragraphs())))
    return path


@pytest.fixture(scope="module")
def examples(squad_file):
    return load_squad(squad_file)


@pytest.fixture(scope="module")
def features(examples, tokenizer):
    return prepare_features(examples, tokenizer, max_seq_len=MAX_LEN, doc_stride=STRIDE, max_query_len=MAX_QUERY)


def _context_span(offsets):
    ctx = [o for o in offsets if o is not None]
    return ctx[0][0], ctx[-1][1]


def _one_hot_logits(features, width):
    start = torch.zeros(len(features), width)
    end = torch.zeros(len(features), width)
    rows = torch.arange(len(features))
    start[rows, torch.tensor(features.start_positions)] = 1.0
    end[rows, torch.tensor(features.end_positions)] = 1.0
    return start, end


# --- loading ---


def test_load_squad(examples):
    assert len(examples) == 40 + 3 + 1
    by_id = {ex.id: ex for ex in examples}
    mayor = by_id["mayor"]
    assert [t for t, _ in mayor.answers] == ["Ann Lee", "the mayor, Ann Lee"]
    for ex in examples:
        for text, start in ex.answers:
            assert ex.context[start : start + len(text)] == text
    assert by_id["repeat"].answers[0][1] > by_id["repeat"].context.index("1990")  # the later occurrence


def test_answer_not_at_its_start_names_the_question(tmp_path):
    ctx = "The cat sat on the mat."
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_squad_json([(ctx, [("q-ok", "?", [("cat", 4)]), ("q-bad", "?", [("dog", 4)])])])))
    with pytest.raises(ValueError, match=r"question 'q-bad': answer 'dog' is not at answer_start=4.*does not occur"):
        load_squad(path)
    path.write_text(json.dumps(_squad_json([(ctx, [("q-off", "?", [("mat", 20)])])])))
    with pytest.raises(ValueError, match=r"'q-off'.*occurs at char 19, so answer_start looks off by 1"):
        load_squad(path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is empty"),
        ("{not json", "not valid JSON"),
        ('{"version": "1.1"}', "not in SQuAD v1.1 format"),
        ('{"data": []}', "holds no questions"),
    ],
)
def test_bad_squad_files(tmp_path, content, match):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_squad(path)


def test_unanswerable_and_duplicate_questions(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps(_squad_json([("Some text.", [("q-none", "?", [])])])))
    with pytest.raises(ValueError, match="'q-none' has no answer"):
        load_squad(path)
    path.write_text(
        json.dumps(_squad_json([("Some text.", [("dup", "?", [("Some", 0)]), ("dup", "?", [("text", 5)])])]))
    )
    with pytest.raises(ValueError, match="'dup' occurs twice"):
        load_squad(path)


# --- windows ---


def test_windows_shape_overlap_and_offsets(examples, features, tokenizer):
    assert len(features) > len(examples)  # long contexts were split
    assert sorted(set(features.example_index)) == list(range(len(examples)))
    for f in range(len(features)):
        ids, types, offs = features.input_ids[f], features.token_type_ids[f], features.offsets[f]
        assert len(ids) == len(types) == len(offs) <= MAX_LEN
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert offs[0] is None and offs[-1] is None
        question_side = [k for k, t in enumerate(types) if t == 0]
        assert len(question_side) - 2 <= MAX_QUERY  # [CLS] question [SEP]
        assert all(offs[k] is None for k in question_side)
        assert all(offs[k] is not None for k in range(len(ids) - 1) if types[k] == 1)
    # Consecutive windows of one example share exactly `doc_stride` context tokens.
    for f in range(1, len(features)):
        if features.example_index[f] == features.example_index[f - 1]:
            prev = [o for o in features.offsets[f - 1] if o is not None]
            cur = [o for o in features.offsets[f] if o is not None]
            assert prev[-STRIDE:] == cur[:STRIDE]


def test_long_question_is_cut_to_max_query_len(examples, features):
    f = features.example_index.index(next(i for i, ex in enumerate(examples) if ex.id == "long-question"))
    assert features.token_type_ids[f].count(0) == MAX_QUERY + 2


def test_labels_point_at_the_answer_or_cls(examples, features, tokenizer):
    straddled = 0
    for f, ex_idx in enumerate(features.example_index):
        ex = examples[ex_idx]
        text, start = ex.answers[0]
        lo, hi = _context_span(features.offsets[f])
        s, e = features.start_positions[f], features.end_positions[f]
        if lo <= start and start + len(text) <= hi:
            offs = features.offsets[f]
            assert 0 < s <= e and ex.context[offs[s][0] : offs[e][1]] == text
        else:
            assert s == e == 0  # [CLS]
            straddled += start < hi and start + len(text) > lo  # partly inside this window
    # The sliding examples put the answer across a window boundary at least once.
    assert straddled >= 1


def _straddled_then_later(examples, features):
    """Ids of examples whose answer is cut by a window boundary and wholly inside only a later window."""
    found = []
    for ex_idx, ex in enumerate(examples):
        text, start = ex.answers[0]
        windows = [f for f, i in enumerate(features.example_index) if i == ex_idx]
        spans = {f: _context_span(features.offsets[f]) for f in windows}
        cut = [f for f in windows if start < spans[f][1] and start + len(text) > spans[f][0]]  # overlaps the answer
        partial = [f for f in cut if features.start_positions[f] == 0]  # ... but does not hold all of it
        whole = [f for f in windows if features.start_positions[f] > 0]
        assert whole, ex.id  # an answer shorter than the overlap is always wholly inside some window
        if partial and min(partial) < min(whole):
            found.append(ex.id)
    return found


def test_a_straddled_answer_is_recovered_from_a_later_window(examples, features):
    ids = _straddled_then_later(examples, features)
    assert ids, "no example has an answer cut by a boundary and wholly inside only a later window"
    width = max(len(x) for x in features.input_ids)
    preds = postprocess(examples, features, *_one_hot_logits(features, width))
    by_id = {ex.id: ex for ex in examples}
    assert all(preds[i] == by_id[i].answers[0][0] == ANSWER for i in ids)


def test_perfect_logits_recover_every_gold_answer(examples, features):
    width = max(len(ids) for ids in features.input_ids)
    start, end = _one_hot_logits(features, width + 5)  # wider than any window, as after batch padding
    preds = postprocess(examples, features, start, end)
    assert preds == {ex.id: ex.answers[0][0] for ex in examples}
    assert squad_evaluate(preds, examples) == {"exact_match": 100.0, "f1": 100.0}


def test_perfect_logits_through_padded_batches(examples, features, tokenizer):
    start_rows, end_rows = [None] * len(features), [None] * len(features)
    for batch in qa_batches(features, batch_size=7, pad_token_id=tokenizer.pad_token_id, shuffle=True, seed=1):
        assert batch["input_ids"].shape[1] % 8 == 0
        one_hot_s = torch.nn.functional.one_hot(batch["start_positions"], batch["input_ids"].shape[1]).float()
        one_hot_e = torch.nn.functional.one_hot(batch["end_positions"], batch["input_ids"].shape[1]).float()
        for row, f in enumerate(batch["feature_index"].tolist()):
            assert batch["attention_mask"][row].sum() == len(features.input_ids[f])
            start_rows[f], end_rows[f] = one_hot_s[row], one_hot_e[row]
    preds = postprocess(examples, features, start_rows, end_rows)  # F rows of differing widths
    assert squad_evaluate(preds, examples) == {"exact_match": 100.0, "f1": 100.0}


def test_no_stride_with_a_long_context_is_an_error(examples, tokenizer):
    for stride in (0, None):
        with pytest.raises(
            ValueError, match=r"contexts longer than one window .* no stride.*'slide-0'.*doc_stride > 0"
        ):
            prepare_features(examples, tokenizer, max_seq_len=MAX_LEN, doc_stride=stride, max_query_len=MAX_QUERY)
    short = [QAExample("s", "Where?", "In Zurich.", [("Zurich", 3)])]
    feats = prepare_features(short, tokenizer, max_seq_len=MAX_LEN, doc_stride=None, max_query_len=MAX_QUERY)
    assert len(feats) == 1 and postprocess(short, feats, *_one_hot_logits(feats, MAX_LEN)) == {"s": "Zurich"}


@pytest.mark.parametrize(
    "max_len, stride, max_query, match",
    [(40, 29, 8, r"doc_stride=29 must be in \[0, 29\)"), (40, -1, 8, "doc_stride=-1"), (10, 2, 8, "leaves no room")],
)
def test_window_arguments_are_validated(examples, tokenizer, max_len, stride, max_query, match):
    with pytest.raises(ValueError, match=match):
        prepare_features(examples, tokenizer, max_seq_len=max_len, doc_stride=stride, max_query_len=max_query)


def test_answer_with_surrounding_space_labels_only_its_words(tokenizer):
    ctx = "The bridge is called the Golden Gate today."
    start = ctx.index(" Golden")
    ex = QAExample("ws", "Which bridge?", ctx, [(" Golden Gate ", start)])
    feats = prepare_features([ex], tokenizer, max_seq_len=MAX_LEN, doc_stride=STRIDE, max_query_len=MAX_QUERY)
    offs = feats.offsets[0]
    assert ctx[offs[feats.start_positions[0]][0] : offs[feats.end_positions[0]][1]] == "Golden Gate"


# --- decoding ---


def _brute_force(examples, features, start, end, max_answer_len):
    """Best (start + end) over every context span of every window, in plain Python."""
    best = {ex.id: (float("-inf"), "") for ex in examples}
    start, end = start.tolist(), end.tolist()
    for f, ex_idx in enumerate(features.example_index):
        ctx = [k for k, o in enumerate(features.offsets[f]) if o is not None]
        for i in ctx:
            for j in ctx:
                if i <= j < i + max_answer_len:
                    score = start[f][i] + end[f][j]
                    ex = examples[ex_idx]
                    if score > best[ex.id][0]:
                        text = ex.context[features.offsets[f][i][0] : features.offsets[f][j][1]]
                        best[ex.id] = (score, text)
    return {k: v[1] for k, v in best.items()}


def test_decoding_matches_brute_force_on_random_logits(examples, features):
    width = max(len(ids) for ids in features.input_ids)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(len(features), width, generator=g)
    end = torch.randn(len(features), width, generator=g)
    # With n_best ≥ the window width the top-n pairing considers every span: it must find the exact optimum.
    for max_answer_len in (1, 4, 30):
        got = postprocess(examples, features, start, end, n_best=width, max_answer_len=max_answer_len)
        assert got == _brute_force(examples, features, start, end, max_answer_len)
    # bf16 logits are accepted (decoded in fp32).
    assert postprocess(examples, features, start.bfloat16(), end.bfloat16()).keys() == {ex.id for ex in examples}


def test_postprocess_rejects_mis_shaped_logits(examples, features):
    with pytest.raises(ValueError, match="must be \\(F, L\\)"):
        postprocess(examples, features, torch.zeros(len(features), 3), torch.zeros(len(features), 3))

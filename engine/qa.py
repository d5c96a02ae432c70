"""Extractive question answering (SQuAD v1.1): load examples, cut them into windows, decode spans.

A context longer than one window is covered by several windows `[CLS] question [SEP] context piece
[SEP]` whose context pieces overlap by `doc_stride` tokens (the fast tokenizer's `stride`, i.e. the
Hugging Face convention: the overlap, not the step between window starts as in the original BERT
`run_squad.py`). Each window keeps, per token, the character span it covers in the context (None for
question and special tokens), so spans predicted in any window map back to context text.

Training labels: the first gold answer's start and end token positions in each window, or the [CLS]
position (0 for BERT) in both when the answer is not wholly inside that window. An answer shorter than
the overlap is therefore wholly inside at least one window.

Decoding (`postprocess`): per window, the n_best highest start and end logits over context tokens
are paired; pairs with end ≥ start and at most `max_answer_len` tokens are scored start + end; the best
pair over all windows of an example gives the answer text. Then `engine.metrics.squad_evaluate`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.batching import pad_to_multiple

__all__ = ["QAExample", "QAFeatures", "load_squad", "postprocess", "prepare_features", "qa_batches"]

_TOKENIZE_CHUNK = 1000  # examples per tokenizer call: bounds the size of one BatchEncoding


@dataclass
class QAExample:
    """One question about one context.

    Attributes:
        id: the question id (unique; predictions are keyed by it).
        question: the question text.
        context: the paragraph the answer is taken from.
        answers: gold answers as (text, char_start) with context[char_start : char_start + len(text)] == text;
            the first one labels training windows, all of them count in evaluation. May be empty for
            questions to be answered (no labels then).
    """

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class QAFeatures:
    """Tokenized windows of QA examples (F windows; lists are unpadded, each ≤ max_seq_len long).

    Attributes:
        input_ids: F lists of int token ids, `[CLS] question [SEP] context piece [SEP]`.
        token_type_ids: F lists of int segment ids (0 question side, 1 context side).
        example_index: F ints, the position in `examples` each window came from.
        offsets: F lists, per token the (start, end) character span in the example's context, or None
            for question and special tokens.
        start_positions: F ints, the answer's first token in the window, or the [CLS] index.
        end_positions: F ints, the answer's last token (inclusive), or the [CLS] index.
    """

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    example_index: list[int]
    offsets: list[list[tuple[int, int] | None]]
    start_positions: list[int]
    end_positions: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


# --- loading ---


def _check_answer(qid: str, context: str, text: str, start: int) -> None:
    # Compare the slice at answer_start, not context.find(text): an answer's text often occurs
    # earlier in the paragraph too, and only answer_start says which occurrence is meant.
    if context[start : start + len(text)] == text:
        return
    found = context.find(text)
    if found < 0:
        hint = "the text does not occur anywhere in the context"
    else:
        hint = f"the text occurs at char {found}, so answer_start looks off by {start - found}"
    raise ValueError(
        f"question {qid!r}: answer {text!r} is not at answer_start={start} in its context "
        f"(found {context[start : start + len(text)]!r} there); {hint}. Fix answer_start or the answer text"
    )


def load_squad(path: str | Path) -> list[QAExample]:
    """Read a SQuAD v1.1 JSON file: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text", "answer_start"}]}]}]}]}.

    Args:
        path: the JSON file (train or dev; dev questions carry several gold answers).

    Returns:
        the examples in file order, one per question.

    Raises:
        ValueError: an empty or malformed file, a question without answers (SQuAD v2 unanswerable
            questions are not supported), a duplicate id, or an answer whose text is not at its
            answer_start in the context (the message names the question id).
    """
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if not raw.strip():
        raise ValueError(f"{path} is empty: it holds no SQuAD examples")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f'{path} is not in SQuAD v1.1 format: expected {{"data": [{{"title", "paragraphs": [...]}}]}}')

    examples: list[QAExample] = []
    seen: set[str] = set()
    for article in doc["data"]:
        for para in article.get("paragraphs", []):
            context = para["context"]
            for qa in para.get("qas", []):
                qid = str(qa["id"])
                if qid in seen:
                    raise ValueError(f"{path}: question id {qid!r} occurs twice; ids must be unique")
                seen.add(qid)
                answers = [(str(a["text"]), int(a["answer_start"])) for a in qa.get("answers", [])]
                if not answers or qa.get("is_impossible", False):
                    raise ValueError(
                        f"{path}: question {qid!r} has no answer; unanswerable (SQuAD v2) questions are not "
                        "supported: drop them or use SQuAD v1.1 data"
                    )
                for text, start in answers:
                    if not text.strip():
                        raise ValueError(f"{path}: question {qid!r} has an empty answer text")
                    _check_answer(qid, context, text, start)
                examples.append(QAExample(qid, qa["question"], context, answers))
    if not examples:
        raise ValueError(f"{path} holds no questions")
    return examples


# --- windows ---


def _truncate_questions(questions: list[str], tokenizer, max_query_len: int) -> list[str]:
    """Cut questions to at most `max_query_len` tokens, at a token boundary in the text.

    `truncation="only_second"` never shortens the question, and the tokenizer aborts when a question
    leaves no room for context, so long questions are cut here. The cut is at the character end of
    the last kept token; WordPiece's greedy longest match gives a prefix of a word the same leading
    pieces, so re-tokenizing the cut text yields the kept tokens (checked, and cut further if not).
    """
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = list(questions)
    for i, offs in enumerate(enc["offset_mapping"]):
        keep = max_query_len
        while len(offs) > max_query_len and keep > 0:
            out[i] = questions[i][: offs[keep - 1][1]]
            if len(tokenizer(out[i], add_special_tokens=False)["input_ids"]) <= max_query_len:
                break
            keep -= 1
    return out


def prepare_features(
    examples: Sequence[QAExample],
    tokenizer,
    max_seq_len: int = 384,
    doc_stride: int | None = 128,
    max_query_len: int = 64,
) -> QAFeatures:
    """Cut examples into `[CLS] question [SEP] context piece [SEP]` windows with training labels.

    Args:
        examples: E QA examples.
        tokenizer: a fast Hugging Face tokenizer (offsets need one), question-first pair layout (BERT).
        max_seq_len: window length L in tokens, special tokens included.
        doc_stride: tokens of context shared by consecutive windows of one example (the overlap).
            0 or None means no windowing: every context must then fit in one window.
        max_query_len: questions are cut to this many tokens.

    Returns:
        QAFeatures with F ≥ E windows.

    Raises:
        ValueError: the window leaves no room for context, doc_stride is not smaller than the context
            room max_seq_len − max_query_len − special tokens, or (without a stride) a context does not
            fit in one window (the message names the example ids).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            "prepare_features needs a fast tokenizer (for offsets and windows); load it with use_fast=True"
        )
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be ≥ 1, got {max_query_len}")
    stride = int(doc_stride or 0)
    room = max_seq_len - max_query_len - tokenizer.num_special_tokens_to_add(pair=True)
    if room < 1:
        raise ValueError(
            f"max_seq_len={max_seq_len} leaves no room for context after a {max_query_len}-token question "
            "and the special tokens; raise max_seq_len or lower max_query_len"
        )
    if stride < 0 or stride >= room:
        # The tokenizer needs stride < context tokens per window, or it aborts the process (a Rust panic).
        raise ValueError(
            f"doc_stride={doc_stride} must be in [0, {room}): the context room of a window is max_seq_len - "
            f"max_query_len - special tokens = {max_seq_len} - {max_query_len} - "
            f"{tokenizer.num_special_tokens_to_add(pair=True)} = {room}; lower doc_stride or max_query_len"
        )

    feats = QAFeatures([], [], [], [], [], [])
    too_long: list[str] = []
    for chunk_start in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[chunk_start : chunk_start + _TOKENIZE_CHUNK]
        questions = _truncate_questions([ex.question for ex in chunk], tokenizer, max_query_len)
        enc = tokenizer(
            questions,
            [ex.context for ex in chunk],
            truncation="only_second",
            max_length=max_seq_len,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_attention_mask=False,
        )
        sample_map = enc["overflow_to_sample_mapping"]
        for f, local_idx in enumerate(sample_map):
            ex_idx = chunk_start + local_idx
            ex = examples[ex_idx]
            if stride == 0 and f > 0 and sample_map[f - 1] == local_idx:
                if not too_long or too_long[-1] != ex.id:
                    too_long.append(ex.id)
                continue
            ids = list(enc["input_ids"][f])
            seq_ids = enc.sequence_ids(f)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][f], seq_ids)]
            start, end = _label_window(ex, offsets, ids.index(tokenizer.cls_token_id))
            feats.input_ids.append(ids)
            feats.token_type_ids.append(list(enc["token_type_ids"][f]))
            feats.example_index.append(ex_idx)
            feats.offsets.append(offsets)
            feats.start_positions.append(start)
            feats.end_positions.append(end)
    if too_long:
        shown = ", ".join(repr(i) for i in too_long[:20]) + (
            f", ... ({len(too_long)} in all)" if len(too_long) > 20 else ""
        )
        raise ValueError(
            f"contexts longer than one window (max_seq_len={max_seq_len}) with no stride (doc_stride={doc_stride}) "
            f"in examples {shown}: they would be cut and their answers lost; set doc_stride > 0 (e.g. 128) to "
            "cover them with overlapping windows, or raise max_seq_len"
        )
    return feats


def _label_window(ex: QAExample, offsets: list[tuple[int, int] | None], cls_index: int) -> tuple[int, int]:
    """Token positions (start, end inclusive) of the first gold answer in a window, else (cls, cls)."""
    if not ex.answers:
        return cls_index, cls_index
    text, char_start = ex.answers[0]
    # Tighten the span to non-space characters: a gold text with a leading space would otherwise be
    # mapped to the token before it, whose span is the last one starting at or before that space.
    char_end = char_start + len(text)  # exclusive
    while char_start < char_end and ex.context[char_start].isspace():
        char_start += 1
    while char_end > char_start and ex.context[char_end - 1].isspace():
        char_end -= 1
    ctx = [k for k, o in enumerate(offsets) if o is not None]
    if not ctx:  # an empty context gives windows without context tokens
        return cls_index, cls_index
    first, last = ctx[0], ctx[-1]
    if offsets[first][0] > char_start or offsets[last][1] < char_end:
        return cls_index, cls_index  # not wholly inside this window
    start = first
    while start <= last and offsets[start][0] <= char_start:  # last token starting at or before the answer
        start += 1
    end = last
    while end >= first and offsets[end][1] >= char_end:  # first token ending at or after the answer
        end -= 1
    return start - 1, end + 1


def qa_batches(
    features: QAFeatures,
    batch_size: int,
    pad_token_id: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    pad_to_multiple_of: int = 8,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches of QA windows, in order (evaluation) or a seeded random order (training).

    Yields:
        {"input_ids": int64 (B, L), "token_type_ids": int64 (B, L), "attention_mask": int64 (B, L),
         "start_positions": int64 (B,), "end_positions": int64 (B,), "feature_index": int64 (B,)},
        L the batch's longest window rounded up to a multiple of `pad_to_multiple_of`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    n = len(features)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    for begin in range(0, n, batch_size):
        idx = order[begin : begin + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        ids, mask = pad_to_multiple([features.input_ids[i] for i in idx], pad_token_id, pad_to_multiple_of)
        types, _ = pad_to_multiple([features.token_type_ids[i] for i in idx], 0, pad_to_multiple_of)
        yield {
            "input_ids": ids,
            "token_type_ids": types,
            "attention_mask": mask,
            "start_positions": torch.tensor([features.start_positions[i] for i in idx], dtype=torch.long),
            "end_positions": torch.tensor([features.end_positions[i] for i in idx], dtype=torch.long),
            "feature_index": torch.tensor(idx, dtype=torch.long),
        }


# --- decoding ---


def _logit_matrix(logits, n_features: int, width: int, name: str) -> torch.Tensor:
    """(F, L') float32 CPU matrix from a tensor/array, or from F 1-D rows of differing lengths."""
    if isinstance(logits, (list, tuple)) and logits and not isinstance(logits[0], (int, float)):
        rows = [torch.as_tensor(r, dtype=torch.float32).reshape(-1) for r in logits]
        out = torch.full((len(rows), max(r.numel() for r in rows)), float("-inf"))
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
    else:
        out = torch.as_tensor(logits).detach().to("cpu", torch.float32)
    if out.dim() != 2 or out.shape[0] != n_features or out.shape[1] < width:
        raise ValueError(
            f"{name} must be (F, L) with F = {n_features} windows and L ≥ {width} (the longest window), "
            f"got shape {tuple(out.shape)}"
        )
    return out[:, :width]


def postprocess(
    examples: Sequence[QAExample],
    features: QAFeatures,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_len: int = 30,
) -> dict[str, str]:
    """Decode each example's best answer span over all its windows back to context text.

    Args:
        examples: the E examples `features` were made from.
        features: their F windows (`prepare_features`).
        start_logits: float (F, L) (any float dtype; a tensor, array, or F rows), L ≥ the longest window;
            positions past a window's end are ignored.
        end_logits: float (F, L), likewise.
        n_best: the top-n start and top-n end positions (over context tokens) per window are paired.
        max_answer_len: longest answer in tokens (end − start + 1).

    Returns:
        question id → answer text for every example ("" when no window offers a valid span).
    """
    n = len(features)
    if n == 0:
        return {ex.id: "" for ex in examples}
    width = max(len(o) for o in features.offsets)
    start = _logit_matrix(start_logits, n, width, "start_logits")  # (F, W)
    end = _logit_matrix(end_logits, n, width, "end_logits")  # (F, W)
    in_context = torch.zeros((n, width), dtype=torch.bool)  # (F, W)
    for f, offs in enumerate(features.offsets):
        in_context[f, : len(offs)] = torch.tensor([o is not None for o in offs])
    neg_inf = float("-inf")
    start = start.masked_fill(~in_context, neg_inf)
    end = end.masked_fill(~in_context, neg_inf)

    k = min(n_best, width)
    s_val, s_idx = start.topk(k, dim=1)  # (F, k)
    e_val, e_idx = end.topk(k, dim=1)  # (F, k)
    score = s_val[:, :, None] + e_val[:, None, :]  # (F, k, k)
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1  # (F, k, k), tokens in the span
    valid = (length >= 1) & (length <= max_answer_len) & torch.isfinite(score)
    score = score.masked_fill(~valid, neg_inf).reshape(n, k * k)
    best_score, best_pair = score.max(dim=1)  # (F,), (F,)
    best_start = s_idx.gather(1, (best_pair // k)[:, None])[:, 0].tolist()
    best_end = e_idx.gather(1, (best_pair % k)[:, None])[:, 0].tolist()
    best_score = best_score.tolist()

    answers = {ex.id: "" for ex in examples}
    top = [neg_inf] * len(examples)
    for f, ex_idx in enumerate(features.example_index):
        if best_score[f] > top[ex_idx]:  # strict: ties keep the earlier window
            top[ex_idx] = best_score[f]
            offs = features.offsets[f]
            answers[examples[ex_idx].id] = examples[ex_idx].context[offs[best_start[f]][0] : offs[best_end[f]][1]]
    return answers

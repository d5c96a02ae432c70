"""`distill peek`: a masked-language model's distribution at one [MASK], at several softmax temperatures.

Hinton et al.'s "dark knowledge": at T = 1 a trained model puts nearly all its mass on its top word, and what it
knows about the others (that "book" fits "i completed writing my [MASK]" and "car" does not) hides in
probabilities too small to read. Dividing the logits by T > 1 before the softmax,

    p_T(w) = exp(z_w / T) / Σ_v exp(z_v / T),

keeps the ranking (exp(z / T) is increasing in z) but shrinks every log-ratio log p(a)/p(b) = (z_a − z_b) / T by
T, so the plausible runners-up rise into view above the absurd words. That softened distribution is what the KD
term of the triple loss asks the student to match (`--temperature`, KL(p_T^teacher ‖ p_T^student)).

Steps: tokenizer of the model folder → the [MASK]'s position → encoder + `lm_head` at that position only → logits
(V,) → `kernels.softmax(logits, T)` for each T → a table of the top-k tokens, or of given candidate words
(renormalized over themselves, and as their share of the whole vocabulary); with `--student`, both models side by
side and KL(model ‖ student) over the full vocabulary at each T.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from engine import checkpoint as ckpt
from engine.corpus import load_tokenizer
from engine.loop import resolve_device
from engine.options import PeekOptions
from engine.report import format_table
from engine.runs import check_same_vocabulary, describe


@dataclass
class Masked:
    """One tokenized text with its single [MASK]."""

    input_ids: torch.Tensor  # (1, L) int64, [CLS] … [SEP]
    position: int  # index of the [MASK] in the sequence


def mask_position(tokenizer, text: str) -> Masked:
    """Tokenize `text` (special tokens added) and find its one mask token.

    Raises:
        ValueError: no mask token, or several (the message says which token to write).
    """
    mask = tokenizer.mask_token
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"]  # (1, L)
    where = (ids[0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    if not where:
        raise ValueError(
            f'--text has no {mask}: write {mask} where the word to predict goes, e.g. "i completed writing my {mask}"'
        )
    if len(where) > 1:
        raise ValueError(f"--text has {len(where)} {mask} tokens; peek shows the distribution at one: keep one {mask}")
    return Masked(ids, where[0])


def candidate_ids(tokenizer, words: list[str]) -> list[int]:
    """The vocabulary id of each word (duplicates dropped, order kept).

    Raises:
        ValueError: naming every word that is not exactly one known token, with the pieces it splits into.
    """
    ids, bad = [], []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            bad.append(f"{word!r} is {len(pieces)} tokens {tokenizer.convert_ids_to_tokens(pieces)}")
        elif pieces[0] == tokenizer.unk_token_id:
            bad.append(f"{word!r} is not in the vocabulary (it becomes {tokenizer.unk_token})")
        elif pieces[0] not in ids:
            ids.append(pieces[0])
    if bad:
        raise ValueError(
            "--candidates must each be one token of the model's vocabulary: " + "; ".join(bad) + ". "
            "A word of several pieces has no single probability at one [MASK]; choose one-token words"
        )
    return ids


@torch.no_grad()
def masked_logits(model, masked: Masked) -> torch.Tensor:
    """The MLM head's logits at the mask: encoder over the whole text, head on that one position only.

    Args:
        model: an `engine.model.MaskedLM`.
        masked: the tokenized text and its mask position.
    Returns:
        (V,) fp32 logits on the model's device.
    """
    ids = masked.input_ids.to(model.lm_head.decoder.bias.device)
    h = model.encoder(ids).last_hidden_state[0, masked.position]  # (H,)
    return model.lm_head(h).float()  # (V,)


def _load(path: str, device: torch.device, flag: str):
    if not ckpt.has_mlm_head(path):  # also: a missing folder or config.json is named here
        raise ValueError(
            f"{flag} {path} has no MLM head (an encoder-only checkpoint), so it has no distribution over words; "
            f"train one with `distill adapt-head --model {path} --out DIR` and pass {flag} DIR/model"
        )
    return ckpt.load_model(path, head="mlm", device=device)[0].eval()


def _pct(p: float) -> str:
    """A probability as a percentage with 3 significant digits (62.1%, 0.0412%, 1.2e-05%)."""
    return f"{100 * p:.3g}%"


def _check(opts: PeekOptions) -> None:
    if not opts.model:
        raise ValueError("--model is required (the no-argument default sets the bundled teacher)")
    if not opts.temperatures or any(t <= 0 for t in opts.temperatures):
        raise ValueError(f"--temperatures must be one or more numbers > 0, got {opts.temperatures}")
    if opts.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {opts.top_k}")


def peek(opts: PeekOptions) -> dict:
    """Print the table of the distribution at the [MASK] of `opts.text` at each temperature; return it as a dict.

    Returns:
        {"text", "mask_position", "temperatures", "shown" ("candidates" or "top-k"), "tokens", "token_ids",
        "models": {"model": {"path", "probabilities": [[p per token] per T], "renormalized" (candidates only)},
        "student": … (with --student)}, "kl": [KL(model ‖ student) in nats per T] (with --student)}.
        Probabilities are over the whole vocabulary; "renormalized" divides them by the candidates' total.
    """
    _check(opts)
    device = resolve_device(opts.device)
    model = _load(opts.model, device, "--model")
    tokenizer = load_tokenizer(opts.model)
    masked = mask_position(tokenizer, opts.text)
    paths = {"model": opts.model}
    models = {"model": model}
    if opts.student:
        models["student"] = _load(opts.student, device, "--student")
        paths["student"] = opts.student
        check_same_vocabulary(Path(opts.model), Path(opts.student), model, models["student"])
    temperatures = [float(t) for t in opts.temperatures]
    logits = {name: masked_logits(m, masked) for name, m in models.items()}  # (V,) each
    probs = {name: [kernels.softmax(z, t) for t in temperatures] for name, z in logits.items()}  # T × (V,)

    if opts.candidates:
        ids = candidate_ids(tokenizer, opts.candidates)
    else:  # the ranking is the same at every T (module docstring); the student's top-k join the model's
        ids = []
        for name in models:
            ids += [i for i in torch.topk(logits[name], min(opts.top_k, logits[name].numel())).indices.tolist()
                    if i not in ids]  # fmt: skip
    index = torch.tensor(ids, device=device)
    report = {
        "text": opts.text,
        "mask_position": masked.position,
        "temperatures": temperatures,
        "shown": "candidates" if opts.candidates else "top-k",
        "tokens": tokenizer.convert_ids_to_tokens(ids),
        "token_ids": ids,
        "models": {},
    }
    for name in models:
        picked = [p[index] for p in probs[name]]  # T × (K,)
        entry = {"path": paths[name], "probabilities": [p.tolist() for p in picked]}
        if opts.candidates:
            entry["renormalized"] = [(p / p.sum()).tolist() for p in picked]
        report["models"][name] = entry
    if opts.student:
        # KL(p_T^model ‖ p_T^student) over the full vocabulary, with the log-probabilities from our kernel.
        report["kl"] = [
            float((p * (kernels.log_softmax(logits["model"], t) - kernels.log_softmax(logits["student"], t))).sum())
            for p, t in zip(probs["model"], temperatures)
        ]
    print(f"{describe(model)}: {opts.model}" + (f"\nstudent {describe(models['student'])}: {opts.student}"
                                                if opts.student else ""))  # fmt: skip
    print(format_peek(report, vocab_size=model.config.vocab_size))
    return report


def format_peek(report: dict, vocab_size: int) -> str:
    """The printed table of a `peek` report: one row per token, one column per temperature (and model)."""
    temperatures, tokens = report["temperatures"], report["tokens"]
    names = list(report["models"])
    labels = {"model": "teacher", "student": "student"} if len(names) == 2 else {"model": ""}
    header = ("token",) + tuple(
        f"T={t:g}" + (f" {labels[n]}" if labels[n] else "") for t in temperatures for n in names
    )
    candidates = report["shown"] == "candidates"

    def cell(name: str, ti: int, k: int | None) -> str:
        m = report["models"][name]
        if k is None:  # the total row: the candidates' (or the top-k's) mass in the whole vocabulary
            share = sum(m["probabilities"][ti])
            return f"100% ({_pct(share)})" if candidates else _pct(1 - share)
        p = m["probabilities"][ti][k]
        return f"{_pct(m['renormalized'][ti][k])} ({_pct(p)})" if candidates else _pct(p)

    rows = [(tok,) + tuple(cell(n, ti, k) for ti in range(len(temperatures)) for n in names)
            for k, tok in enumerate(tokens)]  # fmt: skip
    rows.append(("(all of them)" if candidates else "(rest)",) + tuple(
        cell(n, ti, None) for ti in range(len(temperatures)) for n in names))  # fmt: skip
    lines = [f"{report['text']!r}: the distribution at the [MASK] (token {report['mask_position']})"]
    if candidates:
        lines.append(f"each word's probability renormalized over the candidates; in brackets, its probability over "
                     f"the whole vocabulary of {vocab_size} tokens")  # fmt: skip
    else:
        whose = (
            "the teacher's most probable tokens, then the student's" if len(names) == 2 else "the most probable tokens"
        )
        lines.append(f"{whose} (the same at every T: dividing by T keeps the ranking); (rest): the other "
                     f"{vocab_size - len(tokens)} tokens")  # fmt: skip
    lines.append(format_table(rows, header))
    if "kl" in report:
        kl = ", ".join(f"T={t:g} {v:.4g}" for t, v in zip(temperatures, report["kl"]))
        lines.append(f"KL(teacher ‖ student) over the whole vocabulary, in nats: {kl}")
    return "\n".join(lines)

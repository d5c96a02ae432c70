"""`distill peek` on tiny models whose MLM head is set by hand: the logits at the [MASK] are known exactly, so every
printed probability can be computed by hand with `torch.softmax(z / T)`."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import cli
from engine import peek as pk
from engine.checkpoint import save_model
from engine.config import ModelConfig
from engine.corpus import load_tokenizer
from engine.model import build_model
from engine.options import PeekOptions

WORDS = ["homework", "cake", "assignment", "car", "book"]
TEMPERATURES = [1.0, 2.0, 5.0]


def _hand_set(path: Path, minilm_dir, z: torch.Tensor | None, seed: int = 0) -> Path:
    """A 1-layer BERT whose MLM head outputs exactly `z` at every position (None: an encoder without a head).

    The head is dense → gelu → LayerNorm → decoder; a LayerNorm with weight 0 and bias 0 outputs exact zeros,
    so the decoder returns its bias: logits = z whatever the text.
    """
    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64)
    model = build_model(config, "mlm" if z is not None else None)
    if z is not None:
        with torch.no_grad():
            model.lm_head.layer_norm.weight.zero_()
            model.lm_head.layer_norm.bias.zero_()
            model.lm_head.decoder.bias.copy_(z)
    return save_model(model, path, tokenizer_dir=minilm_dir)


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


def _logits(tokenizer, planted: dict[str, float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokenizer.vocab_size, generator=g)  # (V,) fp32
    for word, value in planted.items():
        z[tokenizer.convert_tokens_to_ids(word)] = value
    return z


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, minilm_dir, tokenizer):
    z = _logits(tokenizer, {"homework": 9.0, "assignment": 6.5, "book": 6.0, "cake": 1.0, "car": 0.5}, seed=1)
    return _hand_set(tmp_path_factory.mktemp("teacher"), minilm_dir, z), z


@pytest.fixture(scope="module")
def student(tmp_path_factory, minilm_dir, tokenizer):
    z = _logits(tokenizer, {"homework": 7.0, "assignment": 3.0, "book": 6.5, "cake": 4.0, "car": 2.0}, seed=2)
    return _hand_set(tmp_path_factory.mktemp("student"), minilm_dir, z, seed=1), z


def _pct(p) -> str:
    return f"{100 * float(p):.3g}%"


def test_candidates_are_softmax_by_hand_and_printed(teacher, tokenizer, capsys):
    path, z = teacher
    report = pk.peek(PeekOptions(model=str(path), text="i completed writing my [MASK].", candidates=WORDS,
                                 temperatures=TEMPERATURES, device="cpu"))  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids(WORDS)
    assert report["token_ids"] == ids and report["tokens"] == WORDS and report["mask_position"] == 5
    printed = capsys.readouterr().out
    for ti, t in enumerate(TEMPERATURES):
        p = torch.softmax(z / t, dim=-1)[ids]  # by hand: the whole vocabulary's softmax, read at the candidates
        got = report["models"]["model"]
        assert got["probabilities"][ti] == p.tolist()  # the CPU path of our kernel is exact
        torch.testing.assert_close(torch.tensor(got["renormalized"][ti]), p / p.sum(), rtol=1e-6, atol=0)
        for k, word in enumerate(WORDS):
            assert f"{_pct(p[k] / p.sum())} ({_pct(p[k])})" in printed, (word, t)
        assert f"100% ({_pct(p.sum())})" in printed
    # Dark knowledge: T = 1 leaves the runners-up near 0; T = 5 lifts the plausible ones above the absurd ones.
    renorm = report["models"]["model"]["renormalized"]
    assert renorm[0][0] > 0.85 and renorm[2][2] > 0.15 > renorm[2][1]
    # One row per word, in the given order, with one column per temperature.
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("token"))
    assert lines[header].split() == ["token", "T=1", "T=2", "T=5"]
    assert [line.split()[0] for line in lines[header + 2 : header + 7]] == WORDS


def test_top_k_is_the_same_ranking_at_every_temperature(teacher, capsys):
    path, z = teacher
    report = pk.peek(PeekOptions(model=str(path), text="my [MASK] is late", top_k=4, temperatures=[0.5, 3.0],
                                 device="cpu"))  # fmt: skip
    top = torch.topk(z, 4).indices.tolist()
    assert report["shown"] == "top-k" and report["token_ids"] == top
    printed = capsys.readouterr().out
    for ti, t in enumerate([0.5, 3.0]):
        p = torch.softmax(z / t, dim=-1)
        assert report["models"]["model"]["probabilities"][ti] == p[top].tolist()
        for v in p[top]:
            assert _pct(v) in printed
        assert _pct(1 - p[top].sum()) in printed  # the (rest) row


def test_teacher_and_student_side_by_side_with_their_kl(teacher, student, capsys):
    (tpath, zt), (spath, zs) = teacher, student
    report = pk.peek(PeekOptions(model=str(tpath), student=str(spath), text="i completed writing my [MASK]",
                                 candidates=WORDS, temperatures=TEMPERATURES, device="cpu"))  # fmt: skip
    ids = report["token_ids"]
    printed = capsys.readouterr().out
    assert "T=1 teacher" in printed and "T=5 student" in printed
    for ti, t in enumerate(TEMPERATURES):
        pt, ps = torch.softmax(zt / t, -1), torch.softmax(zs / t, -1)
        assert report["models"]["student"]["probabilities"][ti] == ps[ids].tolist()
        kl = (pt * (torch.log_softmax(zt / t, -1) - torch.log_softmax(zs / t, -1))).sum()  # full vocabulary
        assert report["kl"][ti] == pytest.approx(float(kl), rel=1e-5)
        assert f"T={t:g} {report['kl'][ti]:.4g}" in printed
    assert report["kl"][0] > report["kl"][1] > report["kl"][2]  # softer distributions are closer


def test_errors_name_the_fix(teacher, tmp_path, minilm_dir, capsys):
    path, _ = teacher

    def run(**over):
        return pk.peek(PeekOptions(**{"model": str(path), "text": "i completed writing my [MASK]", **over}))

    with pytest.raises(ValueError, match=r"no \[MASK\]: write \[MASK\] where"):
        run(text="i completed writing my homework")
    with pytest.raises(ValueError, match=r"2 \[MASK\] tokens.*keep one"):
        run(text="my [MASK] and my [MASK]")
    with pytest.raises(ValueError, match=r"'homeworks' is 2 tokens \['homework', '##s'\]") as e:
        run(candidates=["book", "homeworks"])
    assert "'book'" not in str(e.value)  # only the words at fault are named
    with pytest.raises(ValueError, match="temperatures"):
        run(temperatures=[1.0, 0.0])
    headless = _hand_set(tmp_path / "headless", minilm_dir, None)
    with pytest.raises(ValueError, match=r"no MLM head.*distill adapt-head --model"):
        run(model=str(headless))
    # Through the CLI: one line, exit code 2, no traceback.
    code = cli.main(["peek", "--model", str(path), "--text", "no mask here", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("distill peek: error: --text has no [MASK]") and "Traceback" not in err


def test_no_arguments_peek_the_example_with_the_bundled_teacher(teacher, monkeypatch, capsys):
    from engine import pretrain

    path, _ = teacher
    monkeypatch.setattr(pretrain, "bundled_teacher", lambda run: path)  # the real one trains a head (minutes)
    assert cli.main(["peek", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "'i completed writing my [MASK]'" in out and all(w in out for w in WORDS)
    # --text alone drops the example's candidates: the top-k are shown.
    assert cli.main(["peek", "--device", "cpu", "--text", "a [MASK] day", "--top-k", "3"]) == 0
    assert "(rest)" in capsys.readouterr().out


def test_help_answers_without_torch():
    code = (
        "import sys; from engine import cli\n"
        "for c in ('peek', 'ablate'):\n"
        "    assert cli.main([c, '--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'cli imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--candidates" in done.stdout and "--variants" in done.stdout

"""`distill pretrain` / `adapt-head` end to end on tiny models and real text (BBC News, MiniLM's tokenizer)."""

import errno
import json
import os
import shutil
import signal

import pytest
import torch

from engine import checkpoint as ckpt
from engine import cli, loop
from engine import pretrain as pt
from engine.defaults import bbc_news_dir
from engine.options import (
    AdaptOptions,
    DataOptions,
    MaskingOptions,
    ModelOptions,
    ObjectiveOptions,
    OptimOptions,
    RunOptions,
)

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _tiny_bert(path, minilm_dir, with_head=True, layers=4, hidden=32, vocab=30522, seed=0, init_range=0.2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, initializer_range=init_range,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(config) if with_head else transformers.BertModel(config)
    model.save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copy(minilm_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 real BBC articles as .txt files."""
    src = (
        sorted((bbc_news_dir() / "business").glob("*.txt"))[:30] + sorted((bbc_news_dir() / "tech").glob("*.txt"))[:30]
    )
    d = tmp_path_factory.mktemp("corpus")
    for f in src:
        shutil.copy(f, d / f"{f.parent.name}-{f.name}")
    return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, minilm_dir):
    from pathlib import Path

    return _tiny_bert(tmp_path_factory.mktemp("teacher"), Path(minilm_dir))


def _options(teacher, corpus, out, **over):
    m = ModelOptions(teacher=str(teacher), student_num_layers=2)
    d = DataOptions(data=[str(corpus)], max_seq_len=32, batch_size=8, heldout_fraction=0.1)
    mk = MaskingOptions()
    o = ObjectiveOptions()
    op = OptimOptions(steps=over.pop("steps", 12), lr=over.pop("lr", 5e-3), warmup=0.1)
    r = RunOptions(out=str(out), log_every=1, progress=False, eval_batches=4, seed=0)
    for k, v in over.items():
        for section in (m, d, mk, o, op, r):
            if hasattr(section, k):
                setattr(section, k, v)
    return m, d, mk, o, op, r


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _losses(out):
    return [line["loss"] for line in _lines(out)]


def test_short_run_learns_and_reports(teacher, corpus, tmp_path):
    out = tmp_path / "run"
    report = pt.pretrain(*_options(teacher, corpus, out, steps=30, eval_every=10))
    lines = _lines(out)
    assert len(lines) == 30
    mean = lambda key, part: sum(line[key] for line in part) / len(part)  # noqa: E731
    for key, factor in (("loss", 0.95), ("kd", 0.5), ("mlm", 0.99), ("cos", 0.9)):  # every term falls
        assert mean(key, lines[-5:]) < factor * mean(key, lines[:5]), key
    evals = [json.loads(x)["eval"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 2
    # Held-out: the student's perplexity falls and its hidden states move toward its (random, tiny) teacher's. Not
    # top-1 agreement: with a random teacher it swings either way with the seed (seeds 0-3, step 10 -> 30: 11.8% ->
    # 0.7%, 56.2% -> 1.4%, 13.2% -> 41.0%, 11.8% -> 13.2%), while the hidden cosine rose on every seed (0.84-0.86 ->
    # 0.87-0.90). The accuracy and agreement of a real teacher show in the bundled default run (README).
    assert report["student"]["perplexity"] < evals[0]["student"]["perplexity"]
    assert report["hidden_cosine"] > evals[0]["hidden_cosine"]
    assert report["steps"] == 30 and report["teacher"]["parameters"] > report["student"]["parameters"]
    for name in ("report.json", "metrics.jsonl", "student/model.safetensors", "student/config.json", "checkpoint"):
        assert (out / name).exists(), name
    # The saved student loads in transformers with no missing keys and agrees with our model.
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(out / "student", output_loading_info=True)
    assert not info["missing_keys"]
    ours = ckpt.load_model(out / "student", head="mlm")[0].eval()
    ids = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    with torch.no_grad():
        a = hf.eval()(input_ids=ids, attention_mask=mask).logits
        b = ours(ids, mask).logits
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-4, rtol=1e-4)


class _StopAfter:
    """Sends SIGINT to this process when the loop takes its `n`-th batch (a real signal, real handler)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def wrap(self, cls):
        outer = self

        class Batches(cls):
            def next_batch(self):
                outer.calls += 1
                if outer.calls == outer.n:
                    os.kill(os.getpid(), signal.SIGINT)
                return super().next_batch()

        return Batches


def test_interrupt_and_resume_follow_the_uninterrupted_run(teacher, corpus, tmp_path, monkeypatch):
    full = tmp_path / "full"
    pt.pretrain(*_options(teacher, corpus, full, steps=8))
    reference = _losses(full)

    part = tmp_path / "part"
    original = pt.LengthGroupedBatches
    monkeypatch.setattr(pt, "LengthGroupedBatches", _StopAfter(4).wrap(original))
    result = pt.pretrain(*_options(teacher, corpus, part, steps=8))
    assert result == {"interrupted": True, "step": 4}  # the step in flight finished, then it saved
    assert torch.load(part / "checkpoint" / "trainer_state.pt", weights_only=False)["step"] == 4
    # Put back only this patch: monkeypatch.undo() would also undo the autouse TRITON_INTERPRET=0 and run the
    # interpreter at V = 30522 (20 minutes instead of one).
    monkeypatch.setattr(pt, "LengthGroupedBatches", original)
    pt.pretrain(*_options(teacher, corpus, part, steps=8, resume=True))
    resumed = _losses(part)
    assert len(resumed) == 8
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=1e-6)


def test_refuses_another_run_unless_resume_or_overwrite(teacher, corpus, tmp_path):
    out = tmp_path / "run"
    pt.pretrain(*_options(teacher, corpus, out, steps=2))
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        pt.pretrain(*_options(teacher, corpus, out, steps=2))
    pt.pretrain(*_options(teacher, corpus, out, steps=2, overwrite=True))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        pt.pretrain(*_options(teacher, corpus, stranger, steps=2, overwrite=True))
    assert (stranger / "notes.txt").read_text() == "mine"


def test_failed_save_keeps_the_last_good_checkpoint(teacher, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        name = str(getattr(f, "name", f))  # the loop saves into an open file
        calls["n"] += name.endswith("trainer_state.pt")
        if calls["n"] == 2 and name.endswith("trainer_state.pt"):  # the second checkpoint hits a full disk
            real_save(obj, f, *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(loop.torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full while writing the checkpoint"):
        pt.pretrain(*_options(teacher, corpus, out, steps=4, save_every=2))
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    ckpt.load_model(out / "checkpoint" / "model", head="mlm")  # loads whole
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_bad_inputs_are_clear(teacher, corpus, tmp_path, minilm_dir):
    from pathlib import Path

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        pt.pretrain(*_options(teacher, empty, tmp_path / "a", steps=1))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        pt.pretrain(*_options(teacher, tmp_path / "missing.txt", tmp_path / "b", steps=1))
    headless = _tiny_bert(tmp_path / "headless", Path(minilm_dir), with_head=False)
    with pytest.raises(ValueError, match="adapt-head"):
        pt.pretrain(*_options(headless, corpus, tmp_path / "c", steps=1))
    small_vocab = _tiny_bert(tmp_path / "small", Path(minilm_dir), vocab=1000, layers=2)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        pt.pretrain(*_options(teacher, corpus, tmp_path / "d", steps=1, student=str(small_vocab)))
    with pytest.raises(ValueError, match="temperature"):
        pt.pretrain(*_options(teacher, corpus, tmp_path / "e", steps=1, temperature=0.0))


def test_adapt_head_trains_only_the_head_and_feeds_pretrain(tmp_path, corpus, minilm_dir):
    from pathlib import Path

    headless = _tiny_bert(tmp_path / "headless", Path(minilm_dir), with_head=False)
    before = ckpt.load_model(headless, head=None)[0].state_dict()
    report = pt.adapt_head(
        AdaptOptions(model=str(headless)),
        DataOptions(data=[str(corpus)], max_seq_len=64, batch_size=8),
        MaskingOptions(),
        OptimOptions(steps=6, lr=5e-3),
        RunOptions(out=str(tmp_path / "adapt"), progress=False, log_every=1, eval_batches=2),
    )
    model_dir = tmp_path / "adapt" / "model"
    assert ckpt.has_mlm_head(model_dir) and report["steps"] == 6
    after = ckpt.load_model(model_dir, head="mlm")[0]
    enc = after.encoder.state_dict()
    for k, v in before.items():  # the encoder (and the tied decoder = word embeddings) stayed frozen
        kk = k.removeprefix("encoder.")
        if kk in enc:
            torch.testing.assert_close(enc[kk], v, rtol=0, atol=0)
    # The CLI runs pretrain on it.
    code = cli.main(
        ["pretrain", "--teacher", str(model_dir), "--data", str(corpus), "--out", str(tmp_path / "p"),
         "--steps", "2", "--student-num-layers", "1", "--max-seq-len", "64", "--batch-size", "4", "--no-progress",
         "--eval-batches", "1"]
    )  # fmt: skip
    assert code == 0 and (tmp_path / "p" / "report.json").is_file()


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    code = cli.main(
        ["pretrain", "--teacher", str(tmp_path / "nope"), "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "error" in capsys.readouterr().err

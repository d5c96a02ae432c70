"""`distill ablate` end to end on a tiny teacher and real text: the five variants, their options, the table, and a
killed ablation resumed through the CLI."""

import json
import shutil

import pytest
import torch

from engine import ablate as ab
from engine import checkpoint as ckpt
from engine import cli
from engine import pretrain as pt
from engine.config import ModelConfig
from engine.defaults import bbc_news_dir
from engine.model import build_model
from engine.options import AblateOptions
from tests.engine.test_pretrain import _StopAfter  # SIGINT at the loop's n-th batch

STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 real BBC articles as .txt files."""
    src = [f for topic in ("business", "tech") for f in sorted((bbc_news_dir() / topic).glob("*.txt"))[:20]]
    d = tmp_path_factory.mktemp("corpus")
    for f in src:
        shutil.copy(f, d / f"{f.parent.name}-{f.name}")
    return d


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, minilm_dir):
    """A random 4-layer BERT with an MLM head and MiniLM's tokenizer."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64, max_position_embeddings=64,
                         initializer_range=0.2)  # fmt: skip
    return ckpt.save_model(build_model(config, "mlm"), tmp_path_factory.mktemp("teacher"), tokenizer_dir=minilm_dir)


def _argv(teacher, corpus, out, *extra):
    return ["ablate", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out), "--steps", str(STEPS),
            "--student-num-layers", "2", "--max-seq-len", "32", "--batch-size", "8", "--heldout-fraction", "0.1",
            "--lr", "5e-3", "--eval-batches", "2", "--log-every", "1", "--device", "cpu", "--no-progress",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def ablation(teacher, corpus, tmp_path_factory):
    """All five variants through the CLI: (out folder, its ablation.json)."""
    out = tmp_path_factory.mktemp("ablation") / "run"
    # A module fixture is set up before the function-scoped autouse TRITON_INTERPRET=0 of conftest.py: without its
    # own, the kernels would run in Triton's interpreter at V = 30522 (minutes per step instead of milliseconds).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        assert cli.main(_argv(teacher, corpus, out)) == 0
    return out, json.loads((out / "ablation.json").read_text())


def _run_json(out, variant):
    return json.loads((out / variant / "run.json").read_text())


def _losses(path):
    return [json.loads(x)["loss"] for x in path.read_text().splitlines() if '"loss"' in x]


def test_every_variant_runs_with_the_options_its_name_says(ablation):
    out, table = ablation
    assert list(table["variants"]) == ["triple", "no-kd", "no-cos", "no-mlm", "random-init"]
    alphas = {
        "triple": (5.0, 2.0, 1.0), "no-kd": (0.0, 2.0, 1.0), "no-cos": (5.0, 2.0, 0.0), "no-mlm": (5.0, 0.0, 1.0),
        "random-init": (5.0, 2.0, 1.0),
    }  # fmt: skip
    triple = _run_json(out, "triple")
    for name, (ce, mlm, cos) in alphas.items():
        record = _run_json(out, name)
        o = record["objective"]
        assert (o["alpha_ce"], o["alpha_mlm"], o["alpha_cos"]) == (ce, mlm, cos), name
        student = "student_random" if name == "random-init" else "student_init"
        assert record["model"]["student"] == str(out / student), name
        assert record["run"]["out"] == str(out / name)
        # Same data, seed and budget: everything else is the triple's.
        for section in ("data", "masking", "optim"):
            assert record[section] == triple[section], (name, section)
        assert (
            record["run"]["seed"] == triple["run"]["seed"] and record["model"]["teacher"] == triple["model"]["teacher"]
        )
        assert len(_losses(out / name / "metrics.jsonl")) == STEPS
        # The removed term is absent from the training log; the others are there.
        line = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        for term, weight in zip(("kd", "mlm", "cos"), (ce, mlm, cos)):
            assert (line.get(term, 0.0) != 0.0) == (weight > 0), (name, term)
    # random-init: the same architecture as the triple's student, other weights.
    init, rand = ckpt.read_tensors(out / "student_init")[0], ckpt.read_tensors(out / "student_random")[0]
    assert ModelConfig.from_pretrained(out / "student_init") == ModelConfig.from_pretrained(out / "student_random")
    assert init.keys() == rand.keys()
    assert not torch.equal(init["distilbert.transformer.layer.0.ffn.lin1.weight"],
                           rand["distilbert.transformer.layer.0.ffn.lin1.weight"])  # fmt: skip


def test_table_variations_are_the_differences_of_the_reports(ablation):
    out, table = ablation
    reports = {n: json.loads((out / n / "report.json").read_text()) for n in table["variants"]}
    base = reports["triple"]
    for name, row in table["variants"].items():
        r = reports[name]
        scores = {"mlm_accuracy": r["student"]["mlm_accuracy"], "perplexity": r["student"]["perplexity"],
                  "top1_agreement": r["top1_agreement"]}  # fmt: skip
        base_scores = {"mlm_accuracy": base["student"]["mlm_accuracy"], "perplexity": base["student"]["perplexity"],
                       "top1_agreement": base["top1_agreement"]}  # fmt: skip
        for k, v in scores.items():
            assert row[k] == v
            assert row["variation"][k] == v - base_scores[k]
        assert row["paper"] == ab.VARIANTS[name].paper
        # Every variant saw the same held-out masks: the teacher's scores agree to the last digit.
        assert r["teacher"]["mlm_accuracy"] == base["teacher"]["mlm_accuracy"]
        assert r["heldout_masked_tokens"] == base["heldout_masked_tokens"]
    assert table["variants"]["triple"]["variation"] == {"mlm_accuracy": 0.0, "perplexity": 0.0, "top1_agreement": 0.0}
    # The printed / Markdown table shows those differences (points for accuracy and agreement).
    md = (out / "ablation.md").read_text()
    for name, row in table["variants"].items():
        d = row["variation"]
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] == f"{100 * d['mlm_accuracy']:+.2f}" and cells[5] == f"{d['perplexity']:+.1f}"
        assert cells[7] == f"{100 * d['top1_agreement']:+.2f}"
    assert ab.format_ablation(table).count("\n") == len(table["variants"]) + 3  # title, header, rule, teacher row
    assert table["chart"] and (out / "ablation.png").stat().st_size > 0


def test_killed_ablation_resumes_without_rerunning_finished_variants(ablation, teacher, corpus, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    full, _ = ablation
    out = tmp_path / "run"
    argv = _argv(teacher, corpus, out, "--variants", "triple,no-kd", "no-mlm")
    original = pt.LengthGroupedBatches
    monkeypatch.setattr(pt, "LengthGroupedBatches", _StopAfter(STEPS + 2).wrap(original))  # step 2 of no-kd
    assert cli.main(argv) == 130
    assert (out / "triple" / "report.json").is_file() and not (out / "no-kd" / "report.json").exists()
    assert not (out / "no-mlm").exists()
    monkeypatch.setattr(pt, "LengthGroupedBatches", original)  # only this patch: keep TRITON_INTERPRET=0
    finished = (out / "triple" / "report.json").read_bytes()
    calls = []
    real = ab.pretrain
    monkeypatch.setattr(ab, "pretrain", lambda *o: calls.append((o[-1].out, o[-1].resume)) or real(*o))
    assert cli.main(argv + ["--resume"]) == 0
    assert calls == [(str(out / "no-kd"), True), (str(out / "no-mlm"), False)]  # triple was not rerun
    assert (out / "triple" / "report.json").read_bytes() == finished
    table = json.loads((out / "ablation.json").read_text())
    assert list(table["variants"]) == ["triple", "no-kd", "no-mlm"]
    # Same options, same data, same seed: the resumed variant follows the uninterrupted one of the full ablation.
    for name in ("triple", "no-kd", "no-mlm"):
        resumed, reference = _losses(out / name / "metrics.jsonl"), _losses(full / name / "metrics.jsonl")
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference), rtol=1e-5, atol=1e-6)
        assert table["variants"][name]["mlm_accuracy"] == pytest.approx(
            json.loads((full / "ablation.json").read_text())["variants"][name]["mlm_accuracy"]
        )


def test_bad_options_are_clear(ablation, teacher, corpus, tmp_path, capsys):
    full, _ = ablation
    with pytest.raises(ValueError, match="unknown variant 'no-pos'"):
        ab.parse_variants(["triple,no-pos"])
    assert [v.name for v in ab.parse_variants(["no-kd,triple", "no-kd"])] == ["no-kd", "triple"]
    code = cli.main(_argv(teacher, corpus, tmp_path / "a", "--alpha-cos", "0"))
    assert code == 2 and "--alpha-cos is 0" in capsys.readouterr().err
    # Resuming under another budget would make its variants incomparable: refused before anything is touched.
    before = sorted(p.name for p in full.iterdir())
    code = cli.main(_argv(teacher, corpus, full, "--resume", "--lr", "1e-3"))
    assert code == 2 and "--lr 0.005 -> 0.001" in capsys.readouterr().err
    assert sorted(p.name for p in full.iterdir()) == before
    code = cli.main(_argv(teacher, corpus, full))  # without --resume or --overwrite
    assert code == 2 and "--resume" in capsys.readouterr().err
    assert AblateOptions().variants == list(ab.VARIANTS)

"""Data parallelism: W ranks train exactly as 1 rank.

In-process (no process group): the rank shares of the objectives sum, term by term and in gradient, to the 1-process
loss, for pretraining and both task losses, with uneven and empty slices. Under `torchrun` (gloo, 2 CPU processes,
tiny models): a 2-rank `pretrain` and `task` run log the same losses and end with the same weights as 1-rank runs, and
a SIGINT to the launcher followed by --resume reproduces the uninterrupted 2-rank run.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine import distributed
from engine.config import ModelConfig
from engine.distributed import Shard
from engine.model import MaskedLM, QuestionAnswerer, SequenceClassifier
from engine.objectives import PretrainObjective, TaskLoss, device_batch
from engine.options import KDOptions, MaskingOptions, ObjectiveOptions

V = 97
ROOT = Path(__file__).resolve().parents[2]


def _config(arch, layers, **extra):
    d = {"model_type": arch, "vocab_size": V, "max_position_embeddings": 32, **extra}
    if arch == "bert":
        d.update(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32)
    else:
        d.update(dim=16, n_layers=layers, n_heads=2, hidden_dim=32)
    return ModelConfig.from_hf_dict(d)


def _model(cls, arch, layers, seed, **extra):
    torch.manual_seed(seed)
    model = cls(_config(arch, layers, **extra)).eval()  # eval: no dropout, so the passes agree
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _pretrain_batch(rows=5):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (rows, 16), generator=g)
    ids[:, 0] = 1
    attn = torch.ones_like(ids)
    for r in range(1, rows):
        attn[r, 16 - 2 * r :] = 0
    ids[attn == 0] = 0
    return ids, attn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_shard_rows_cover_the_batch_once():
    for n in (1, 3, 8, 13):
        for w in (1, 2, 3, 4):
            taken = []
            for r in range(w):
                rows, real = Shard(r, w).rows(n)
                if real:
                    taken.extend(range(n)[rows])
                else:
                    assert n < w and rows == slice(0, 1)  # a stand-in row of weight 0
            assert taken == list(range(n)), (n, w)
    assert Shard(1, 4).rows(8) == (slice(2, 4), True)


def test_one_process_takes_the_same_code_path():
    assert not torch.distributed.is_initialized()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.shard() == Shard(0, 1)
    t = torch.tensor([1.5])
    assert distributed.all_reduce_sum(t) is t and t.item() == 1.5
    assert distributed.agree_to_stop(True) and not distributed.agree_to_stop(False)
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.run_on_main(lambda: 7) == 7 and distributed.main_first(lambda: 8) == 8
    distributed.check_batch_size(5)  # any size divides by 1
    model = torch.nn.Linear(2, 2)
    parallel = distributed.DataParallel(model, lambda b: (model(b).sum(), {}), torch.device("cpu"))
    assert parallel.ddp is None
    with parallel.no_sync():
        parallel(torch.ones(1, 2))[0].backward()


def test_batch_size_must_divide_by_the_world(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    distributed.check_batch_size(32)
    with pytest.raises(ValueError, match=r"--batch-size 30 is the global batch .* 4 processes .* use 28 or 32"):
        distributed.check_batch_size(30)


@pytest.mark.parametrize(
    "opts",
    [ObjectiveOptions(), ObjectiveOptions(restrict_ce_to_mask=True), ObjectiveOptions(fused_head=False),
     ObjectiveOptions(alpha_ce=0.0, alpha_cos=0.0)],
    ids=["recipe", "restrict", "unfused", "mlm-only"],
)  # fmt: skip
@pytest.mark.parametrize("world,rows", [(2, 6), (3, 5), (4, 3)], ids=["even", "uneven", "empty-rank"])
def test_pretrain_shares_sum_to_the_one_process_loss_and_gradient(opts, world, rows):
    teacher = _model(MaskedLM, "bert", 2, seed=1).requires_grad_(False)
    student = _model(MaskedLM, "distilbert", 2, seed=2)
    ids, attn = _pretrain_batch(rows)
    special, masking = torch.tensor([0, 1, 2, 3, 4]), MaskingOptions(mlm_probability=0.3)

    def run(model, shard):
        gen = torch.Generator().manual_seed(7)  # every rank draws the whole batch's masks from the same state
        objective = PretrainObjective(teacher, model, opts, masking, special, 4, None, gen)
        loss, terms = objective(device_batch(ids, attn, torch.device("cpu"), shard))
        loss.backward()
        return loss.detach(), terms, gen.get_state()

    whole, whole_terms, whole_gen = run(student, None)
    reference = _grads(student)
    total, totals, grads = 0.0, dict.fromkeys(whole_terms, 0.0), {}
    for r in range(world):
        replica = copy.deepcopy(student)
        replica.zero_grad(set_to_none=True)
        loss, terms, gen_state = run(replica, Shard(r, world))
        assert torch.equal(gen_state, whole_gen)  # the generator moves as in a 1-process run
        total = total + loss
        totals = {k: totals[k] + terms[k] for k in terms}
        for k, g in _grads(replica).items():
            grads[k] = grads[k] + g if k in grads else g
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-6)
    for k in whole_terms:
        torch.testing.assert_close(totals[k], whole_terms[k], rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(grads[k], reference[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["classification", "qa"])
@pytest.mark.parametrize("with_teacher", [True, False], ids=["distill", "finetune"])
def test_task_shares_sum_to_the_one_process_loss_and_gradient(task, with_teacher):
    cls = SequenceClassifier if task == "classification" else QuestionAnswerer
    extra = {"num_labels": 3} if task == "classification" else {}
    student = _model(cls, "distilbert", 2, seed=2, **extra)
    teacher = _model(cls, "bert", 2, seed=1, **extra).requires_grad_(False) if with_teacher else None
    b = 6
    ids = torch.randint(5, V, (b, 12), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[3:, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": attn}
    if task == "classification":
        batch["labels"] = torch.tensor([0, 1, 2, 1, 0, 2])
    else:
        batch["start_positions"], batch["end_positions"] = (
            torch.tensor([1, 2, 0, 3, 4, 5]),
            torch.tensor([2, 4, 0, 5, 6, 8]),
        )
        batch["token_type_ids"] = torch.zeros_like(ids)
    kd = KDOptions(alpha=0.3, alpha_ce=0.6, alpha_qa=0.4, temperature=3.0)
    whole, whole_terms = TaskLoss(task, student, teacher, kd)(batch)
    whole.backward()
    reference = _grads(student)
    world, total, grads, totals = 4, 0.0, {}, dict.fromkeys(whole_terms, 0.0)
    for r in range(world):
        replica = copy.deepcopy(student)
        replica.zero_grad(set_to_none=True)
        loss, terms = TaskLoss(task, replica, teacher, kd, shard=Shard(r, world))(batch)
        loss.backward()
        total = total + loss.detach()
        totals = {k: totals[k] + terms[k] for k in terms}
        for k, g in _grads(replica).items():
            grads[k] = grads[k] + g if k in grads else g
    torch.testing.assert_close(total, whole.detach(), rtol=1e-6, atol=1e-6)
    for k in whole_terms:
        torch.testing.assert_close(totals[k], whole_terms[k], rtol=1e-6, atol=1e-6)
    for k in reference:
        torch.testing.assert_close(grads[k], reference[k], rtol=1e-5, atol=1e-6)


_COLLECTIVES = r"""
import json, sys, torch
from engine import distributed
from engine.runs import RunFinished
device = distributed.init(torch.device("cpu"))
r, out = distributed.rank(), {}
out["world"], out["shard"] = distributed.world_size(), list(distributed.Shard(r, 2).rows(8)[0].indices(8))
out["sum"] = distributed.all_reduce_sum(torch.tensor([float(r + 1)])).item()
out["stop"] = [distributed.agree_to_stop(r == 1 and i == 2) for i in range(4)]  # rank 1 alone asks, at step 2
out["gathered"] = distributed.gather_objects({"rank": r})
order = []
out["first"] = distributed.main_first(lambda: order.append(r) or r)
out["shared"] = distributed.run_on_main(lambda: {"from": distributed.rank()})
for error in (FileExistsError("held by another run"), RunFinished("finished", {"steps": 3})):
    def fail(error=error):
        raise error
    try:
        distributed.run_on_main(fail)
    except Exception as e:
        out.setdefault("errors", []).append([type(e).__name__, str(e), getattr(e, "report", None)])
sys.stderr.write("RESULT " + json.dumps(out) + "\n")
"""


def test_collectives_under_torchrun(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(_COLLECTIVES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in run.stderr.splitlines() if "RESULT " in line]
    assert len(results) == 2
    for r, out in enumerate(sorted(results, key=lambda o: o["shard"])):
        assert out["world"] == 2 and out["shard"] == [4 * r, 4 * r + 4, 1]
        assert out["sum"] == 3.0 and out["stop"] == [False, False, True, False]
        assert out["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert out["first"] == r and out["shared"] == {"from": 0}
        assert out["errors"] == [
            ["FileExistsError", "held by another run", None],
            ["RunFinished", "finished", {"steps": 3}],
        ]


# ---- 2 processes under torchrun (gloo) against 1 process ------------------------------------------------------------

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Dropout is drawn per rank (each rank its own stream), so equality needs models without it: the teacher's config
# has none and students made from it inherit that; a DistilBERT classifier keeps its own 0.2, hence BERT students.
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
COMMON = ["--max-seq-len", "32", "--batch-size", "8", "--log-every", "1", "--no-progress", "--eval-batches", "1",
          "--seed", "0", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
STEPS = 10


def _tiny(path, minilm_dir, kind, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shape = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128, initializer_range=0.2)  # fmt: skip
    cfg = transformers.BertConfig(**{**shape, **NO_DROPOUT, **config})
    getattr(transformers, kind)(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (Path(minilm_dir) / name).is_file():
            (path / name).write_bytes((Path(minilm_dir) / name).read_bytes())
    return path


def _distill(args: list[str], nproc: int, wait: bool = True):
    """`distill ARGS` in 1 process, or under torchrun with `nproc` CPU processes (gloo)."""
    # The kernels' PyTorch path (TRITON_INTERPRET=0: the engine tests' setting, which a module fixture runs before).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"}
    launcher = [sys.executable, "-m", "engine"]
    if nproc > 1:  # `torchrun` is torch.distributed.run
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "engine"]  # fmt: skip
    proc = subprocess.Popen([*launcher, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    if not wait:
        return proc
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-3000:]
    return out


def _lines(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_same_run(a: Path, b: Path, model_a: Path, model_b: Path, keys):
    """Equal logged losses (relative 1e-5) at every step and equal final weights (1e-5)."""
    la, lb = _lines(a), _lines(b)
    assert [x["step"] for x in la] == [x["step"] for x in lb] == list(range(1, STEPS + 1))
    for x, y in zip(la, lb):
        for k in keys:
            logged = 1e-4 if k == "grad_norm" else 1e-6  # the precision the metric line rounds to
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=logged), (x["step"], k, x[k], y[k])
    wa, wb = _weights(model_a), _weights(model_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        # Not the attention key biases: their exact gradient is 0 (a bias shared by all keys shifts every score of a
        # query alike, and softmax ignores that), so they move by rounding noise alone, which Adam normalizes into
        # steps of up to lr; they have no effect on any output.
        if not k.endswith(("k_lin.bias", "key.bias")):
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def pretrain_inputs(tmp_path_factory, minilm_dir):
    from engine.defaults import bbc_news_dir

    teacher = _tiny(tmp_path_factory.mktemp("teacher"), minilm_dir, "BertForMaskedLM", num_hidden_layers=4)
    corpus = tmp_path_factory.mktemp("corpus")
    for f in sorted((bbc_news_dir() / "business").glob("*.txt"))[:20]:
        (corpus / f.name).write_bytes(f.read_bytes())
    args = ["pretrain", "--teacher", str(teacher), "--data", str(corpus), "--student-num-layers", "2", *COMMON]
    return args, tmp_path_factory.mktemp("pretrain")


@pytest.fixture(scope="module")
def pretrain_two_ranks(pretrain_inputs):
    args, root = pretrain_inputs
    _distill([*args, "--steps", str(STEPS), "--out", str(root / "two")], nproc=2)
    return root / "two"


@pytest.fixture(scope="module")
def pretrain_one_rank(pretrain_inputs):
    args, root = pretrain_inputs
    _distill([*args, "--steps", str(STEPS), "--out", str(root / "one")], nproc=1)
    return root / "one"


@pytest.mark.slow
def test_two_ranks_pretrain_like_one_rank(pretrain_one_rank, pretrain_two_ranks):
    one, two = pretrain_one_rank, pretrain_two_ranks
    _assert_same_run(one / "metrics.jsonl", two / "metrics.jsonl", one / "student", two / "student",
                     ("loss", "kd", "mlm", "cos", "grad_norm"))  # fmt: skip
    # Rank 0 alone wrote: one metric line per step, one report.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == STEPS
    assert json.loads((two / "report.json").read_text())["steps"] == STEPS


@pytest.mark.slow
def test_signals_to_torchrun_and_workers_then_resume_equal_the_uninterrupted_run(pretrain_inputs, pretrain_two_ranks):
    args, root = pretrain_inputs
    out = root / "interrupted"
    run = [*args, "--steps", str(STEPS), "--out", str(out)]
    proc = _distill(run, nproc=2, wait=False)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and _lines(out / "metrics.jsonl")):  # the first step is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    # A scheduler's stop (scancel) signals every process: each worker gets SIGTERM, then torchrun passes on its own
    # SIGINT (Ctrl-C at the terminal reaches torchrun's group only; the workers run in sessions of their own). The
    # second signal must not kill a worker in the middle of its save.
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert "interrupted at step" in log, log[-3000:]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert 1 <= state["step"] < STEPS and state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not (out / "student").exists()
    shutil.copytree(out, root / "resumed-alone")  # the same checkpoint, resumed below on one process
    _distill([*run, "--resume"], nproc=2)
    ref = pretrain_two_ranks
    strip = lambda line: {k: v for k, v in line.items() if k not in ("tokens_per_s", "elapsed_s")}  # noqa: E731
    assert [strip(x) for x in _lines(out / "metrics.jsonl")] == [strip(x) for x in _lines(ref / "metrics.jsonl")]
    a, b = _weights(out / "student"), _weights(ref / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process(pretrain_inputs, pretrain_one_rank):
    """The data position and the masking generator are global, so a checkpoint of 2 ranks continues on 1 as the
    1-process run does (to rounding); it says that the dropout streams are the part that cannot carry over."""
    args, root = pretrain_inputs
    out = root / "resumed-alone"
    if not out.is_dir():
        pytest.skip("needs the interrupted 2-rank run of the test above")
    log = _distill([*args, "--steps", str(STEPS), "--out", str(out), "--resume"], nproc=1)
    assert "resuming a 2-process checkpoint on 1 processes" in log
    one = pretrain_one_rank
    _assert_same_run(one / "metrics.jsonl", out / "metrics.jsonl", one / "student", out / "student",
                     ("loss", "kd", "mlm", "cos"))  # fmt: skip


@pytest.mark.slow
def test_two_ranks_task_like_one_rank(tmp_path, minilm_dir):
    import random

    labels = ["sport", "business", "tech"]
    teacher = _tiny(
        tmp_path / "teacher", minilm_dir, "BertForSequenceClassification", num_labels=3,
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
    )  # fmt: skip
    words = {"sport": ["match", "goal", "team"], "business": ["shares", "bank"], "tech": ["software", "chip"]}
    rng = random.Random(0)
    rows = []
    for i in range(48):
        label = labels[i % 3]
        text = [rng.choice("the a of in on said people".split()) for _ in range(4)] + rng.choices(words[label], k=3)
        rows.append(json.dumps({"text": " ".join(text), "label": label}))
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    args = ["task", "--teacher", str(teacher), "--data", str(tmp_path / "train.jsonl"), "--student-num-layers", "1",
            "--student-arch", "bert", "--no-baseline", "--latency-iters", "0", "--steps", str(STEPS), "--lr", "1e-3",
            *COMMON]  # fmt: skip
    _distill([*args, "--out", str(tmp_path / "one")], nproc=1)
    _distill([*args, "--out", str(tmp_path / "two")], nproc=2)
    one, two = tmp_path / "one", tmp_path / "two"
    _assert_same_run(one / "distill" / "metrics.jsonl", two / "distill" / "metrics.jsonl", one / "student",
                     two / "student", ("loss", "kd", "ce", "grad_norm"))  # fmt: skip

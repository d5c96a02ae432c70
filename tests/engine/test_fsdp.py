"""FSDP2 sharding (`--fsdp`): W ranks that shard the student and the teacher train exactly as 1 rank.

Under `torchrun` (gloo, 2 CPU processes, the tiny models and corpus of `test_distributed`), with gradient accumulation
(FSDP2's `set_requires_gradient_sync`) and evaluations between steps (a collective once sharded): a 2-rank `--fsdp`
pretrain run logs the same losses and evaluations and ends with the same weights as a 1-rank run; its checkpoint is in
the 1-process format; and a SIGTERM mid-run followed by --resume reproduces the uninterrupted 2-rank run. In-process:
one process with --fsdp is the plain path, and the combinations not built are refused in one line.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from engine import cli, distributed
from engine.options import RunOptions, check_fsdp
from tests.engine import test_distributed
from tests.engine.test_distributed import STEPS, _assert_same_run, _distill, _lines, _weights

pretrain_inputs = test_distributed.pretrain_inputs  # the fixture: tiny teacher (4 layers), 20 BBC texts, common flags

ACCUM = ["--grad-accum", "2", "--eval-every", "4"]  # 2 micro-batches a step; an evaluation at steps 4 and 8
KEYS = ("loss", "kd", "mlm", "cos", "grad_norm")


def _run_args(pretrain_inputs, name: str, *extra: str) -> tuple[list[str], Path]:
    args, root = pretrain_inputs
    return [*args, *ACCUM, "--steps", str(STEPS), "--out", str(root / name), *extra], root / name


@pytest.fixture(scope="module")
def one_rank(pretrain_inputs):
    args, out = _run_args(pretrain_inputs, "accum-one")
    _distill(args, nproc=1)
    return out


@pytest.fixture(scope="module")
def fsdp_two_ranks(pretrain_inputs):
    args, out = _run_args(pretrain_inputs, "fsdp-two", "--fsdp")
    _distill(args, nproc=2)
    return out


def _evals(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines() if '"eval"' in x]


@pytest.mark.slow
def test_fsdp_two_ranks_pretrain_like_one_rank(one_rank, fsdp_two_ranks):
    one, two = one_rank, fsdp_two_ranks
    _assert_same_run(one / "metrics.jsonl", two / "metrics.jsonl", one / "student", two / "student", KEYS)
    # The evaluations between steps ran on both ranks (rank 0 wrote them) and saw the 1-rank weights.
    ev1, ev2 = _evals(one / "metrics.jsonl"), _evals(two / "metrics.jsonl")
    assert [e["step"] for e in ev1] == [e["step"] for e in ev2] == [4, 8]
    for a, b in zip(ev1, ev2):
        for model in ("teacher", "student"):
            for k, v in a["eval"][model].items():
                assert b["eval"][model][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (a["step"], model, k)
    report = json.loads((two / "report.json").read_text())
    assert report["steps"] == STEPS
    assert report["student"]["mlm_accuracy"] == pytest.approx(
        json.loads((one / "report.json").read_text())["student"]["mlm_accuracy"], abs=1e-6
    )


@pytest.mark.slow
def test_fsdp_checkpoint_is_the_one_process_format(one_rank, fsdp_two_ranks):
    """Whole weights under the Hugging Face names, and the optimizer state as a 1-process run writes it."""
    one, two = one_rank / "checkpoint", fsdp_two_ranks / "checkpoint"
    w1, w2 = _weights(one / "model"), _weights(two / "model")
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}
    s1, s2 = (torch.load(d / "trainer_state.pt", weights_only=False) for d in (one, two))
    o1, o2 = s1["optimizer"], s2["optimizer"]
    assert [g["params"] for g in o1["param_groups"]] == [g["params"] for g in o2["param_groups"]]
    assert o1["state"].keys() == o2["state"].keys()
    for i, per_param in o1["state"].items():
        for k, v in per_param.items():
            assert type(o2["state"][i][k]) is torch.Tensor and o2["state"][i][k].shape == v.shape, (i, k)
    assert s2["world_size"] == 2 and s2["step"] == STEPS


@pytest.mark.slow
def test_fsdp_interrupted_then_resumed_equals_the_uninterrupted_run(pretrain_inputs, fsdp_two_ranks):
    args, out = _run_args(pretrain_inputs, "fsdp-interrupted", "--fsdp")
    proc = _distill(args, nproc=2, wait=False)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and _lines(out / "metrics.jsonl")):  # the first step is done
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    for pid in [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]:
        os.kill(pid, signal.SIGTERM)  # every worker, as a scheduler's stop does
    log, _ = proc.communicate(timeout=300)
    assert "interrupted at step" in log, log[-3000:]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert 1 <= state["step"] < STEPS and state["world_size"] == 2
    _distill([*args, "--resume"], nproc=2)
    ref = fsdp_two_ranks
    strip = lambda line: {k: v for k, v in line.items() if k not in ("tokens_per_s", "elapsed_s")}  # noqa: E731
    assert [strip(x) for x in _lines(out / "metrics.jsonl")] == [strip(x) for x in _lines(ref / "metrics.jsonl")]
    a, b = _weights(out / "student"), _weights(ref / "student")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact


def test_one_process_with_fsdp_is_the_plain_path(capsys):
    model = torch.nn.Linear(2, 2)
    parallel = distributed.DataParallel(model, lambda b: (model(b).sum(), {}), torch.device("cpu"), fsdp=True)
    assert parallel.fsdp is None and parallel.ddp is None and not parallel.sharded
    assert "nothing to shard" in capsys.readouterr().out
    with parallel.no_sync():
        parallel(torch.ones(1, 2))[0].backward()
    assert parallel.gathered(lambda: 5) == 5
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    model_state, optimizer_state = parallel.full_state(model, optimizer)
    assert model_state is None and optimizer_state["state"].keys() == {0, 1}


@pytest.mark.parametrize(
    "command,run,cache,message",
    [
        ("task", RunOptions(fsdp=True), "", r"^--fsdp: `distill task` does not shard .*: drop --fsdp$"),
        ("finetune", RunOptions(fsdp=True), "", r"^--fsdp: `distill finetune` does not shard"),
        ("cache-teacher", RunOptions(fsdp=True), "", r"^--fsdp: `distill cache-teacher` does not shard .*of the cache"),
        ("pretrain", RunOptions(fsdp=True, compile=True), "", r"^--fsdp with --compile: .* drop one of them$"),
        ("pretrain", RunOptions(fsdp=True), "cache", r"^--fsdp with --teacher-cache: .* drop --fsdp$"),
    ],
)
def test_fsdp_combinations_not_built_are_refused_in_one_line(command, run, cache, message):
    with pytest.raises(ValueError, match=message) as error:
        check_fsdp(run, command, cache)
    assert "\n" not in str(error.value)
    check_fsdp(RunOptions(fsdp=True), "pretrain")
    check_fsdp(RunOptions(compile=True), "task", "cache")  # without --fsdp nothing is checked


def test_cache_teacher_refuses_fsdp_in_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "cache"
    args = ["--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "train.csv"), "--out", str(out), "--fsdp"]
    assert cli.main(["cache-teacher", *args]) == 2
    assert capsys.readouterr().err == (
        "distill cache-teacher: error: --fsdp: `distill cache-teacher` does not shard (only pretrain and adapt-head "
        "do); under torchrun it runs a whole teacher in every process, each writing its own shards of the cache: drop "
        "--fsdp\n"
    )
    assert not out.exists()

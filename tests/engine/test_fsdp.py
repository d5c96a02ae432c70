"""FSDP2 sharding (`--fsdp`): W ranks that shard the student and the teacher train exactly as 1 rank.

Under `torchrun` (gloo, 2 CPU processes, the tiny models and corpus of `test_distributed`), with gradient accumulation
(a reduce-scatter every micro-batch, shards accumulating) and evaluations between steps (a collective once sharded):
a 2-rank `--fsdp` pretrain run holds half of each model per rank, logs the same losses and evaluations and ends with
the same weights as a 1-rank run; its checkpoint is in the 1-process format; and a SIGTERM mid-run followed by
--resume reproduces the uninterrupted 2-rank run. In-process: one process with --fsdp is the plain path, the
combinations not built are refused in one line, and (2 spawned gloo processes) backward gathers only student
layers, never a teacher layer.
"""

import json
import os
import re
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
    (out.parent / "fsdp-two.log").write_text(_distill(args, nproc=2))
    return out


def _evals(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines() if '"eval"' in x]


@pytest.mark.slow
def test_fsdp_two_ranks_pretrain_like_one_rank(one_rank, fsdp_two_ranks):
    one, two = one_rank, fsdp_two_ranks
    _assert_same_run(one / "metrics.jsonl", two / "metrics.jsonl", one / "student", two / "student", KEYS)
    # ... and it really was sharded (DDP would pass the comparison too): each rank held half of each model.
    log = (two.parent / "fsdp-two.log").read_text()
    shares = re.search(r"FSDP2: sharded over 2 ranks; rank 0 holds ([\d.]+)% of the student's parameters, "
                       r"([\d.]+)% of the teacher's parameters", log)  # fmt: skip
    assert shares, log[-3000:]
    assert all(45 <= float(x) <= 55 for x in shares.groups()), shares.group(0)
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


class _Toy(torch.nn.Module):
    """The shape `DataParallel` shards: `encoder.layers` (one group each) and the rest (the root's group)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.head = torch.nn.Linear(8, 8)

    def forward(self, x):
        for layer in self.encoder.layers:
            x = layer(x).tanh()
        return self.head(x)


def _backward_gathers(rank: int, init: str, found: dict) -> None:
    """One sharded step (teacher first, as the objectives run it); records the groups gathered during backward."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        student, teacher = _Toy(), _Toy().requires_grad_(False)

        def step_loss(x):
            with torch.no_grad():
                t = teacher(x)
            return ((student(x) - t) ** 2).mean(), {}

        parallel = distributed.DataParallel(student, step_loss, torch.device("cpu"), fsdp=True, teacher=teacher)
        gathered, unshard = [], FSDPParamGroup.unshard

        def recording(group, *args, **kwargs):
            if not group.is_unsharded and group._all_gather_result is None:  # a real all-gather starts
                gathered.append(group._module_fqn)
            return unshard(group, *args, **kwargs)

        loss = parallel(torch.randn(4, 8))[0]
        FSDPParamGroup.unshard = recording
        try:
            loss.backward()
        finally:
            FSDPParamGroup.unshard = unshard
        found[rank] = gathered
    finally:
        dist.destroy_process_group()


def test_fsdp_backward_gathers_no_teacher_layer(tmp_path):
    """FSDP2's default backward prefetch replays the forward order, where the teacher's layers ran first: the
    student's first layer would gather the teacher's last layer for nothing. Backward gathers student layers only."""
    found = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_backward_gathers, args=(f"file://{tmp_path / 'rendezvous'}", found), nprocs=2)
    for rank in (0, 1):
        assert found[rank], "nothing was gathered in backward: the student was not sharded"
        assert all("teacher" not in fqn for fqn in found[rank]), found[rank]
        assert sorted(found[rank]) == sorted(f"student.encoder.layers.{i}" for i in range(3)), found[rank]


def test_pretrain_refuses_fsdp_with_compile_before_the_bundled_teacher(tmp_path, monkeypatch, capsys):
    """No --teacher: the refusal comes before the bundled teacher's head would be trained (minutes on a CPU)."""
    import engine.pretrain

    monkeypatch.setattr(engine.pretrain, "bundled_teacher", lambda run: pytest.fail("the bundled teacher was made"))
    assert cli.main(["pretrain", "--fsdp", "--compile", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fsdp with --compile" in err, err
    assert not (tmp_path / "run").exists()

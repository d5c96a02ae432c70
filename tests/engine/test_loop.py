"""engine/loop.py on its own: gradient accumulation against a hand-written AdamW, the schedule, the logging and
evaluation cadence, resume, signals, atomic checkpoints and the overflow skip.

The model is a tiny `SequenceClassifier` (a checkpoint writes our model in the Hugging Face layout, so it must be
one of ours), but its loss reads only the word embeddings, the pooler and the classifier: a mean of token
embeddings → tanh(pooler) → dropout → classifier → cross-entropy. The loop does not care what the loss computes,
and this path keeps every gradient well defined (the attention key bias, for one, has a gradient that is zero in
exact arithmetic, which Adam would blow up from round-off into a full-size update).
"""

import errno
import io
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import loop
from engine.config import ModelConfig
from engine.loop import GeneratorState, load_trainer_state, train
from engine.model import build_model
from engine.options import OptimOptions, RunOptions
from engine.scaler import lr_at

V, H, C, L, B = 29, 12, 3, 5, 4  # vocabulary, width, classes, tokens per row, rows per micro-batch
LOSS_PARAMS = {  # the parameters the loss reads, by short name
    "emb": "encoder.embeddings.word_embeddings.weight",
    "pool_w": "pooler.weight",
    "pool_b": "pooler.bias",
    "cls_w": "classifier.weight",
    "cls_b": "classifier.bias",
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- the model, the data and the loss ------------------------------------------------------------------------------


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=V, hidden_size=H, num_layers=1, num_heads=2, intermediate_size=2 * H, max_position_embeddings=8,
        num_labels=C, initializer_range=0.5,
    )  # fmt: skip
    return build_model(config, head="classification")


def _loss(p: dict, ids, labels, dropout: float = 0.0, noise=None) -> torch.Tensor:
    """Mean cross-entropy of one batch: ids (N, L) int64, labels (N,) int64 → 0-dim, in p's dtype."""
    h = F.embedding(ids, p["emb"]).mean(1)  # (N, H)
    if noise is not None:
        h = h + noise
    z = F.dropout(torch.tanh(h @ p["pool_w"].T + p["pool_b"]), dropout, training=dropout > 0)  # (N, H)
    return F.cross_entropy(z @ p["cls_w"].T + p["cls_b"], labels)


def _params(model) -> dict:
    named = dict(model.named_parameters())
    return {short: named[name] for short, name in LOSS_PARAMS.items()}


class Batches:
    """A data stream whose state is its position: micro-batch i is slice i of fixed random tensors."""

    def __init__(self, ids, labels):
        self.ids, self.labels, self.pos = ids, labels, 0

    def next_batch(self):
        i = self.pos % len(self.ids)
        self.pos += 1
        return self.ids[i], self.labels[i]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _data(n: int, seed: int):
    """n micro-batches: ids (n, B, L) in [1, V) (0 is padding), labels (n, B) in [0, C)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (n, B, L), generator=g), torch.randint(0, C, (n, B), generator=g)


class Job:
    """Model, data, a noise generator checkpointed as an extra Stateful, and a step_loss that records its calls.

    Randomness comes from three places a resume must restore: the global RNG (dropout), the noise generator
    (`stateful`) and the data position.
    """

    def __init__(self, seed: int, data_seed: int = 1, dropout: float = 0.3, noise: float = 0.2):
        self.model = _model(seed)
        self.batches = Batches(*_data(48, data_seed))
        self.generator = torch.Generator().manual_seed(seed + 1000)
        self.stateful = {"noise": GeneratorState(self.generator)}
        self.dropout, self.noise = dropout, noise
        self.calls = 0
        self.losses: list[float] = []  # every micro-batch loss the loop was given
        self.norms: list[float] = []  # every micro-batch noise norm (a second loss term)
        self.training: list[bool] = []  # model.training at each call
        self.on_call = None  # called with the 1-based call number first (to inject signals and faults)
        self.poison: set[int] = set()  # call numbers whose loss is multiplied by inf

    def step_loss(self, batch):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        ids, labels = batch
        noise = self.noise * torch.randn(ids.shape[0], H, generator=self.generator)
        loss = _loss(_params(self.model), ids, labels, self.dropout, noise)
        if self.calls in self.poison:
            loss = loss * math.inf
        self.losses.append(loss.item())
        self.norms.append(noise.norm().item())
        self.training.append(self.model.training)
        return loss, {"noise_norm": noise.norm()}


def _train(job: Job, out: Path, *, steps=8, grad_accum=2, lr=0.05, warmup=0.25, clip=1.0, eps=1e-6, wd=0.01,
           log_every=1, save_every=0, eval_every=0, resume=False, evaluate=None):  # fmt: skip
    optim = OptimOptions(lr=lr, warmup=warmup, clip=clip, eps=eps, weight_decay=wd, grad_accum=grad_accum, steps=steps)
    run = RunOptions(
        out=str(out), precision="fp32", device="cpu", log_every=log_every, save_every=save_every,
        eval_every=eval_every, resume=resume, progress=False,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return train(
        job.model, job.step_loss, job.batches, optim, run, out, torch.device("cpu"), "fp32",
        stateful=job.stateful, evaluate=evaluate,
    )  # fmt: skip


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-exact: {different}"


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in x.items() if k != "elapsed_s"} for x in lines]


def _schedule(step: int, steps: int, warmup_steps: int, peak: float) -> float:
    """The documented schedule, written out: linear warmup to `peak` over `warmup_steps`, then linear to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (steps - step) / (steps - warmup_steps)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 8-step run (grad_accum 2) that resumed and interrupted runs must reproduce."""
    torch.manual_seed(2024)
    job = Job(seed=3)
    out = tmp_path_factory.mktemp("reference")
    result = _train(job, out)
    assert result.step == 8 and not result.interrupted
    return {
        "weights": _weights(job.model),
        "losses": job.losses,
        "lines": [line for line in _lines(out) if "loss" in line],
        "optimizer": load_trainer_state(out / "checkpoint")["optimizer"],
        "rng": torch.get_rng_state(),
        "generator": job.generator.get_state(),
        "pos": job.batches.pos,
    }


def _assert_matches_reference(job: Job, out: Path, reference: dict):
    _assert_same_weights(_weights(job.model), reference["weights"])
    state = load_trainer_state(out / "checkpoint")
    assert state["step"] == 8
    for i, moments in reference["optimizer"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(state["optimizer"]["state"][i][k], v), (i, k)
    assert torch.equal(torch.get_rng_state(), reference["rng"])
    assert torch.equal(job.generator.get_state(), reference["generator"])
    assert job.batches.pos == reference["pos"]


# ---- gradient accumulation and the schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_accumulation_equals_one_adamw_step_on_the_concatenated_batch(tmp_path, grad_accum):
    """k micro-batches per step = one step on their concatenation, by a hand-written fp64 AdamW with clipping."""
    steps, lr, warmup, clip, eps, wd, (b1, b2) = 6, 0.05, 0.5, 0.75, 1e-3, 0.01, OptimOptions().betas
    job = Job(seed=5, data_seed=int(torch.randint(1 << 30, ())), dropout=0.0, noise=0.0)
    init = _weights(job.model)
    result = _train(job, tmp_path, steps=steps, grad_accum=grad_accum, lr=lr, warmup=warmup, clip=clip, eps=eps, wd=wd)
    assert result.step == steps and job.calls == steps * grad_accum

    # The oracle: AdamW as the paper writes it (decoupled weight decay, bias corrections), in fp64, on one batch
    # per step that concatenates the step's micro-batches.
    p = {k: init[name].double().requires_grad_() for k, name in LOSS_PARAMS.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    warmup_steps = math.ceil(warmup * steps)
    losses, clipped = [], []
    for t in range(1, steps + 1):
        rows = slice((t - 1) * grad_accum, t * grad_accum)
        ids, labels = job.batches.ids[rows].flatten(0, 1), job.batches.labels[rows].flatten(0, 1)  # (k·B, L), (k·B,)
        loss = _loss(p, ids, labels)
        grads = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
        losses.append(loss.item())
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        coef = min(1.0, clip / (norm.item() + 1e-6))  # clip_grad_norm_'s coefficient
        clipped.append(coef < 1)
        step_lr = _schedule(t - 1, steps, warmup_steps, lr)
        with torch.no_grad():
            for k, g in grads.items():
                g = g * coef
                p[k].mul_(1 - step_lr * wd)
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g * g
                m_hat, v_hat = m[k] / (1 - b1**t), v2[k] / (1 - b2**t)
                p[k] -= step_lr * m_hat / (v_hat.sqrt() + eps)
    assert any(clipped) and not all(clipped)  # clipping is exercised both ways

    trained = dict(job.model.named_parameters())
    for k, name in LOSS_PARAMS.items():
        torch.testing.assert_close(trained[name].detach().double(), p[k].detach(), rtol=1e-5, atol=1e-6, msg=name)
    # Parameters the loss never reads get no gradient and are left alone (no weight decay either).
    for name, w in trained.items():
        if name not in LOSS_PARAMS.values():
            assert torch.equal(w.detach(), init[name]), name
    # The logged loss of a step is the loss of the concatenated batch before that step's update.
    logged = [line["loss"] for line in result.history]
    assert logged == pytest.approx(losses, abs=2e-6)


def test_schedule_is_applied_per_step_and_logged(tmp_path, monkeypatch):
    """Warmup then linear decay: the lr each optimizer step runs with, and the lr of each metrics line."""
    applied = []
    real = loop.make_optimizer

    def spying(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: applied.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(loop, "make_optimizer", spying)
    steps, peak, warmup = 10, 0.02, 0.25  # ceil(2.5) = 3 warmup steps
    job = Job(seed=11, data_seed=int(torch.randint(1 << 30, ())))
    result = _train(job, tmp_path, steps=steps, grad_accum=1, lr=peak, warmup=warmup)
    expected = [_schedule(s, steps, 3, peak) for s in range(steps)]
    assert expected[:4] == pytest.approx([peak / 3, 2 * peak / 3, peak, peak])
    assert applied == pytest.approx(expected, rel=1e-12)
    assert [line["lr"] for line in result.history] == pytest.approx(expected, rel=1e-12)
    assert [line["lr"] for line in result.history] == [lr_at(s, steps, 3, peak) for s in range(steps)]


# ---- logging and evaluation cadence --------------------------------------------------------------------------------


def test_metric_lines_every_log_every_steps_and_at_the_end_with_interval_means(tmp_path):
    job = Job(seed=13, data_seed=int(torch.randint(1 << 30, ())))
    evals = []

    def evaluate(step):
        evals.append(step)
        job.model.eval()  # as real evaluations do; the loop must switch training back on
        return {"probe": float(step)}

    steps, accum = 8, 2
    result = _train(job, tmp_path, steps=steps, grad_accum=accum, log_every=3, eval_every=2, evaluate=evaluate)
    lines = [x for x in result.history if "loss" in x]
    assert [x["step"] for x in lines] == [3, 6, 8]  # every 3 steps, and the last one
    # Evaluation every 2 steps but not at the last: callers evaluate the final model themselves.
    assert evals == [2, 4, 6]
    assert [x for x in result.history if "eval" in x] == [{"step": s, "eval": {"probe": float(s)}} for s in evals]
    assert all(job.training)
    assert _lines(tmp_path) == result.history  # the file holds exactly what the run returned

    # Hand-computed: a step's loss is the mean of its micro-batches, a line's the mean of its interval's steps.
    def per_step(values):
        return [sum(values[i : i + accum]) / accum for i in range(0, len(values), accum)]

    for key, values in (("loss", job.losses), ("noise_norm", job.norms)):
        s = per_step(values)
        expected = [sum(s[0:3]) / 3, sum(s[3:6]) / 3, sum(s[6:8]) / 2]
        assert [x[key] for x in lines] == pytest.approx(expected, abs=2e-6), key
    for x in lines:
        assert x["skipped_steps"] == 0 and x["grad_norm"] > 0 and x["elapsed_s"] >= 0
        assert "loss_scale" not in x and "tokens_per_s" not in x  # fp32, and no tokens_in given


# ---- resume --------------------------------------------------------------------------------------------------------


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, reference):
    """Crash in step 5 after the step-4 checkpoint; resuming a fresh model, data stream, generator and global RNG
    ends bit-exactly where the uninterrupted run ends."""
    torch.manual_seed(2024)
    job = Job(seed=3)

    def crash(call):
        if call == 10:  # step 5's second micro-batch (grad_accum 2)
            raise RuntimeError("injected crash")

    job.on_call = crash
    with pytest.raises(RuntimeError, match="injected crash"):
        _train(job, tmp_path, save_every=4)
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 4

    torch.manual_seed(777)  # whatever the global RNG holds now, the checkpoint's state must win
    fresh = Job(seed=99)  # other initial weights and noise generator; data position 0
    result = _train(fresh, tmp_path, save_every=4, resume=True)
    assert result.step == 8 and not result.interrupted
    assert [x["step"] for x in result.history] == [5, 6, 7, 8]
    assert fresh.losses == reference["losses"][8:]
    # metrics.jsonl holds the crashed run's lines 1-4 and the resumed run's 5-8: the reference's (times aside).
    assert _untimed(_lines(tmp_path)) == _untimed(reference["lines"])
    _assert_matches_reference(fresh, tmp_path, reference)


def test_resume_cuts_metric_lines_past_the_checkpoint(tmp_path, reference):
    """A crash in step 6, after step 5's metrics line but before its checkpoint (the last was at step 4), and a kill
    in the middle of a line: the resumed run logs steps 5-8 once each, as the uninterrupted run does."""
    torch.manual_seed(2024)
    job = Job(seed=3)

    def crash(call):
        if call == 11:  # step 6's first micro-batch: lines 1-5 are written, the checkpoint is step 4's
            raise RuntimeError("injected crash")

    job.on_call = crash
    with pytest.raises(RuntimeError, match="injected crash"):
        _train(job, tmp_path, save_every=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lr": 0.0')
    assert loop.truncate_metrics(tmp_path / "metrics.jsonl", 5) == 1  # only the broken line is past step 5

    torch.manual_seed(777)
    fresh = Job(seed=99)
    _train(fresh, tmp_path, save_every=4, resume=True)
    assert [x["step"] for x in _lines(tmp_path)] == list(range(1, 9))
    assert _untimed(_lines(tmp_path)) == _untimed(reference["lines"])
    with pytest.raises(ValueError, match="--steps 6: the checkpoint .* is at step 8 already; give --steps 8 or more"):
        _train(Job(seed=3), tmp_path, steps=6, resume=True)


# ---- signals -------------------------------------------------------------------------------------------------------


def _previous_handler(signum, frame):
    """Stands in for whatever handled the signal before the run: the loop must not let the first signal reach it
    (and an escaped SIGTERM fails the test instead of killing pytest)."""
    raise AssertionError(f"signal {signum} reached the handler installed before the run")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_and_resumes_exactly(tmp_path, reference, signum):
    torch.manual_seed(2024)
    job = Job(seed=3)
    job.on_call = lambda call: call == 5 and os.kill(os.getpid(), signum)  # step 3's first micro-batch
    handlers = {s: signal.signal(s, _previous_handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = _train(job, tmp_path, log_every=4)
        assert {s: signal.getsignal(s) for s in handlers} == dict.fromkeys(handlers, _previous_handler)  # both back
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert result.interrupted and result.step == 3
    assert job.calls == 6  # the step in flight finished its second micro-batch, and no other step began
    assert [x["step"] for x in result.history] == [3]  # a line for the interrupted step, off the log_every grid
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 3

    torch.manual_seed(777)
    fresh = Job(seed=99)
    resumed = _train(fresh, tmp_path, log_every=4, resume=True)
    assert resumed.step == 8 and not resumed.interrupted
    assert job.losses + fresh.losses == reference["losses"]
    _assert_matches_reference(fresh, tmp_path, reference)


def test_a_second_sigint_is_not_swallowed(tmp_path):
    """The first Ctrl-C asks for a clean stop; the second gets the previous handler (here KeyboardInterrupt)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        job = Job(seed=17)
        job.on_call = lambda call: call in (3, 4) and os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            _train(job, tmp_path)
        assert job.calls == 4  # it came out of the second micro-batch of step 2, where the second signal hit
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- atomic checkpoints --------------------------------------------------------------------------------------------


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, reference, monkeypatch):
    """The step-4 save dies half-way through writing trainer_state.pt: the step-2 checkpoint is still there, with
    no debris beside it, and resuming from it reproduces the uninterrupted run."""
    real_save = torch.save
    saves = []

    def half_save(obj, f, *args, **kwargs):  # f: the open trainer_state.pt
        saves.append(Path(f.name).name)
        if len(saves) == 2:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    torch.manual_seed(2024)
    job = Job(seed=3)
    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="disk full while writing the checkpoint"):
        _train(job, tmp_path, save_every=2)
    monkeypatch.undo()
    assert saves == ["trainer_state.pt"] * 2
    assert load_trainer_state(tmp_path / "checkpoint")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["model", "trainer_state.pt"]

    torch.manual_seed(777)
    fresh = Job(seed=99)
    result = _train(fresh, tmp_path, save_every=2, resume=True)
    assert result.step == 8
    assert fresh.losses == reference["losses"][4:]
    _assert_matches_reference(fresh, tmp_path, reference)


# ---- overflow ------------------------------------------------------------------------------------------------------


def test_an_inf_loss_in_fp32_skips_the_step_and_counts_it(tmp_path):
    job = Job(seed=19, data_seed=int(torch.randint(1 << 30, ())))
    job.poison = {6}  # step 3's second micro-batch
    starts = {}
    job.on_call = lambda call: call % 2 == 1 and starts.setdefault((call + 1) // 2, _weights(job.model))
    result = _train(job, tmp_path, steps=5, grad_accum=2)
    assert result.step == 5
    _assert_same_weights(starts[4], starts[3])  # step 3 changed nothing
    assert not torch.equal(starts[3]["pooler.weight"], starts[2]["pooler.weight"])  # other steps do
    assert not torch.equal(starts[5]["pooler.weight"], starts[4]["pooler.weight"])
    assert all(torch.isfinite(w).all() for w in _weights(job.model).values())
    lines = result.history
    assert [x["skipped_steps"] for x in lines] == [0, 0, 1, 1, 1]
    assert math.isinf(lines[2]["loss"]) and not math.isfinite(lines[2]["grad_norm"])
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for i, x in enumerate(lines) if i != 2)
    # AdamW's step count (its bias correction) did not count the skipped step.
    moments = load_trainer_state(tmp_path / "checkpoint")["optimizer"]["state"]
    assert {int(s["step"]) for s in moments.values()} == {4}

"""Loss scaler, step guard and schedule: hand-computed expectations."""

import pytest
import torch

from engine.scaler import DynamicLossScaler, StepGuard, lr_at


def _setup(fused=True, clip=0.0, scaler=None):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.AdamW([w], lr=0.1, fused=fused)
    return w, opt, StepGuard(opt, scaler, clip)


def test_scaler_backs_off_and_grows():
    s = DynamicLossScaler(init_scale=8.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)
    s.update(torch.tensor(1.0))
    assert s.scale.item() == 4.0
    s.update(torch.tensor(0.0))
    assert s.scale.item() == 4.0 and s.clean_steps.item() == 1
    s.update(torch.tensor(0.0))
    assert s.scale.item() == 8.0 and s.clean_steps.item() == 0
    s.update(torch.tensor(0.0))
    s.update(torch.tensor(1.0))  # an overflow resets the clean-step count
    assert s.scale.item() == 4.0 and s.clean_steps.item() == 0


@pytest.mark.parametrize("fused", [True, False])
def test_injected_overflow_is_skipped_counted_and_backs_off(fused):
    scaler = DynamicLossScaler(init_scale=2.0**10)
    w, opt, guard = _setup(fused=fused, scaler=scaler)
    before = w.detach().clone()
    scaler.scale_loss((w * torch.tensor([float("inf"), 1.0])).sum()).backward()
    found = guard.step()
    assert found.item() == 1.0
    assert torch.equal(w.detach(), before)  # no silent NaN, no update
    assert torch.isfinite(w).all()
    assert guard.skipped.item() == 1
    assert scaler.scale.item() == 2.0**9
    assert w.grad is None  # zeroed for the next step
    # A clean step afterwards updates the weights, and unscaling gives AdamW the true gradient.
    scaler.scale_loss((w * torch.tensor([3.0, 4.0])).sum()).backward()
    assert guard.step().item() == 0.0
    assert guard.last_grad_norm.item() == pytest.approx(5.0)
    assert not torch.equal(w.detach(), before)
    assert opt.state[w]["step"].item() == 1  # the skipped step did not count


def test_nan_skipped_without_scaler():
    w, opt, guard = _setup()
    (w * torch.tensor([float("nan"), 1.0])).sum().backward()
    before = w.detach().clone()
    assert guard.step().item() == 1.0
    assert torch.equal(w.detach(), before) and guard.skipped.item() == 1


def test_clipping_to_max_norm():
    w, opt, guard = _setup(clip=1.0)
    (w * torch.tensor([30.0, 40.0])).sum().backward()
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(g=w.grad.clone()))
    guard.step()
    assert guard.last_grad_norm.item() == pytest.approx(50.0)  # norm before clipping
    torch.testing.assert_close(seen["g"], torch.tensor([0.6, 0.8]), rtol=1e-5, atol=1e-6)


def test_scaler_state_round_trip():
    a = DynamicLossScaler(init_scale=64.0, growth_interval=3)
    a.update(torch.tensor(0.0))
    b = DynamicLossScaler(init_scale=2.0**16, growth_interval=3)
    b.load_state_dict(a.state_dict())
    assert b.scale.item() == 64.0 and b.clean_steps.item() == 1


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == 0.0
    assert lr_at(0, 10, 0, 2.0) == pytest.approx(2.0)

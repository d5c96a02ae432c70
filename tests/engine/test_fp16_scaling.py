"""fp16 training steps through the loop's loss scaler, against the same steps in fp32 (CPU reference kernels).

`engine.loop` trains fp16 as: loss × scale (`DynamicLossScaler.scale_loss`) → backward → `StepGuard.step()`
(unscale → clip → overflow check → optimizer step → scale update). The kernels form their gradients in the forward,
before the scale exists; if they rounded them to fp16 there, the scale would multiply entries already flushed to 0.
Here fp32 master tensors are cast to fp16 for the forward, as autocast does, and the gradient the optimizer receives
after unscaling is compared with an fp32 run of the same step. fp16 autocast is refused on CPU by the loop, so the
steps are driven directly with the loop's own scaler and guard.
"""

import pytest
import torch
import torch.nn.functional as F

from engine.scaler import DynamicLossScaler, StepGuard
from kernels import cosine_loss, cross_entropy, distill_loss, fused_linear_distill_loss


class GradientRecorder(torch.optim.Optimizer):
    """An optimizer whose step records the gradients it is given (after the guard unscaled and clipped them)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])


def make_problem(n=96, v=400, h=64):
    """fp32 masters whose values fp16 holds exactly (so both runs see the same numbers), and constant targets."""
    masters = dict(
        logits=(torch.randn(n, v) * 3).half().float(),
        hidden=torch.randn(n, h).half().float(),
        head_in=torch.randn(n, h).half().float(),
        head_w=(torch.randn(v, h) / h**0.5 * 3).half().float(),
    )
    consts = dict(
        teacher_logits=(torch.randn(n, v) * 3).half(),
        teacher_hidden=(masters["hidden"] + torch.randn(n, h)).half(),
        teacher_head_in=torch.randn(n, h).half(),
        teacher_head_w=(torch.randn(v, h) / h**0.5 * 3).half(),
        labels=torch.where(torch.rand(n) < 0.15, torch.randint(0, v, (n,)), torch.full((n,), -100)),
        mlm_labels=torch.randint(0, v, (n,)),
    )
    return masters, consts


def objective(p, c, dtype):
    """DistilBERT's three terms on the packed rows (logit-level KD+MLM, cosine, LM-head-fused KD+MLM) plus a CE."""
    x = {k: v.to(dtype) for k, v in p.items()}  # the fp16 forward sees fp16 copies of the fp32 masters
    t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in c.items()}
    loss = distill_loss(x["logits"], t["teacher_logits"], c["labels"], temperature=2.0, kd_weight=5.0, ce_weight=2.0)
    cos = cosine_loss(x["hidden"], t["teacher_hidden"])
    fused = fused_linear_distill_loss(x["head_in"], x["head_w"], None, t["teacher_head_in"], t["teacher_head_w"], None,
                                      c["labels"], chunk_size=32)  # fmt: skip
    ce = cross_entropy(x["logits"], c["mlm_labels"])
    return loss.loss + cos + fused.loss + 0.5 * ce


def run_steps(dtype, steps=3, init_scale=2.0**16):
    torch.manual_seed(0)
    masters, consts = make_problem()
    params = [torch.nn.Parameter(v) for v in masters.values()]
    opt = GradientRecorder(params)
    scaler = DynamicLossScaler(init_scale=init_scale, growth_interval=1) if dtype == torch.float16 else None
    guard = StepGuard(opt, scaler, clip_norm=0.0)
    scales = []
    for _ in range(steps):
        loss = objective(dict(zip(masters, params)), consts, dtype)
        scales.append(float(scaler.scale) if scaler is not None else 1.0)
        (scaler.scale_loss(loss) if scaler is not None else loss).backward()
        assert guard.step().item() == 0.0  # no overflow: every step is taken
    return opt.seen, scales, list(masters)


@pytest.mark.parametrize("init_scale", [2.0**15, 2.0**8])
def test_fp16_steps_through_the_scaler_match_fp32(init_scale):
    """Three steps with the scale doubling after each (2¹⁵, 2¹⁶, 2¹⁷ from the first start: the largest gradient here,
    ~0.25, would overflow fp16 at 2¹⁸, in torch as in ours)."""
    fp16, scales, names = run_steps(torch.float16, init_scale=init_scale)
    fp32, _, _ = run_steps(torch.float32)
    assert scales[-1] > scales[0]  # the scaler grew between steps: several scales were exercised
    for step, (g16s, g32s, scale) in enumerate(zip(fp16, fp32, scales)):
        for name, g16, g32 in zip(names, g16s, g32s):
            # Entries the scaled fp16 gradient holds as normal numbers: the fp16 run must match fp32 within 1%
            # (fp16 rounding is 0.05%), and none may be lost. The head's gradients come out of fp16 matmuls in
            # both torch and the fused loss, so for them allow the fp16 rounding of the sum's terms as well.
            normal = g32.abs() * scale >= 2.0**-14
            assert normal.float().mean() > 0.5, name
            slack = 0.01 * g32.abs()
            if name.startswith("head"):
                slack = slack + 2e-3 * g32.abs().max()
            off = ((g16 - g32).abs() > slack) & normal
            flushed = (g16 == 0) & normal
            assert off.sum() == 0 and flushed.sum() == 0, (
                f"step {step}, {name}: {off.sum().item()} of {normal.sum().item()} entries off by > 1%, "
                f"{flushed.sum().item()} flushed (scale {scale:g})"
            )


def test_the_fp32_reference_is_torch():
    """The fp32 run itself agrees with torch.nn.functional (so the comparison above is against the right thing)."""
    torch.manual_seed(0)
    p, c = make_problem()
    s = p["logits"].clone().requires_grad_()
    distill_loss(
        s, c["teacher_logits"].float(), c["labels"], temperature=2.0, kd_weight=5.0, ce_weight=2.0
    ).loss.backward()
    s2 = p["logits"].clone().requires_grad_()
    kd = F.kl_div(F.log_softmax(s2 / 2, -1), F.softmax(c["teacher_logits"].float() / 2, -1), reduction="batchmean")
    (5.0 * 4 * kd + 2.0 * F.cross_entropy(s2, c["labels"])).backward()
    torch.testing.assert_close(s.grad, s2.grad, atol=1e-7, rtol=1e-5)

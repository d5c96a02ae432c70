"""Mixed-precision step machinery: our dynamic loss scaler, the overflow check, and the LR schedule.

One optimizer step, in the order the loop runs it:

    loss × scale → backward → grads × 1/scale → total norm (one fused pass) → clip →
    found_inf = ¬isfinite(total norm) → optimizer step skipped on the device when found_inf →
    scale update (fp16 only).

Nothing here reads a value back to the host: the overflow flag, the scale, the growth counter and
the count of skipped steps all stay on the device. The skip rides on the fused AdamW kernel's
`found_inf` argument (the same hook `torch.amp.GradScaler` uses), which leaves parameters, moments
and the step count untouched when the flag is set. Optimizers without that hook fall back to one
host read per optimizer step, said in `StepGuard.__init__`'s docstring.
"""

import math

import torch


class DynamicLossScaler:
    """fp16 dynamic loss scaling: grow ×`growth_factor` after `growth_interval` clean steps, back off
    ×`backoff_factor` (and skip the step) on any inf/nan gradient.

    All state lives in device tensors so that the update needs no host sync; `state_dict()` holds
    everything a resume needs (nanoGPT forgets this, so a resumed fp16 run restarts at 2^16).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        if not (growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1 and init_scale > 0):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1, init_scale > 0")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.scale = torch.tensor(float(init_scale), dtype=torch.float32, device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int64, device=device)  # steps since the last overflow or growth

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def inv_scale(self) -> torch.Tensor:
        return self.scale.double().reciprocal().float()

    def update(self, found_inf: torch.Tensor) -> None:
        """Back off on overflow, grow after `growth_interval` clean steps; on the device, no sync."""
        found = found_inf.bool()
        clean = torch.where(found, torch.zeros_like(self.clean_steps), self.clean_steps + 1)
        grow = clean >= self.growth_interval
        self.scale = torch.where(
            found, self.scale * self.backoff_factor, torch.where(grow, self.scale * self.growth_factor, self.scale)
        )
        self.clean_steps = torch.where(grow, torch.zeros_like(clean), clean)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "clean_steps": self.clean_steps.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"].to(self.scale.device, torch.float32)
        self.clean_steps = state["clean_steps"].to(self.clean_steps.device, torch.int64)


class StepGuard:
    """Unscale, clip and overflow-check the gradients, then step the optimizer unless they overflowed.

    Works with and without a loss scaler (bf16 and fp32 runs skip non-finite steps too, and count
    them, rather than writing NaN into the weights). With an optimizer that lacks the fused
    `found_inf` hook (`_step_supports_amp_scaling`), the skip decision is read on the host: one sync
    per optimizer step, not per micro-batch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: DynamicLossScaler | None, clip_norm: float):
        self.optimizer, self.scaler, self.clip_norm = optimizer, scaler, clip_norm
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # optimizer steps skipped on overflow
        self.last_grad_norm = torch.zeros((), device=device)  # unscaled total grad norm of the last step
        self.device_skip = bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def step(self) -> torch.Tensor:
        """Run one guarded optimizer step; returns the found_inf flag (0-dim float, on the device)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.scaler is not None and grads:
            torch._foreach_mul_(grads, self.scaler.inv_scale())
        clip = self.clip_norm if self.clip_norm and self.clip_norm > 0 else math.inf
        # One fused pass gives the norm that clipping needs and the overflow test: a single inf or
        # nan anywhere makes the total norm non-finite.
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True if grads else None)
        # FSDP2: a DTensor; full_tensor() may all-reduce partial norms, so every rank must run this line.
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        found_inf = (~torch.isfinite(norm)).float()
        self.last_grad_norm = norm.detach()
        if self.device_skip:
            self.optimizer.found_inf = found_inf
            self.optimizer.grad_scale = None  # already unscaled above
            self.optimizer.step()
        elif not bool(found_inf):  # host read: the documented fallback
            self.optimizer.step()
        self.skipped += found_inf.long()
        if self.scaler is not None:
            self.scaler.update(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        return found_inf

    def state_dict(self) -> dict:
        return {"skipped": self.skipped.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"].to(self.skipped.device)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to `peak_lr` over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    remaining = max(total_steps - warmup_steps, 1)
    return peak_lr * max(0.0, (total_steps - step) / remaining)

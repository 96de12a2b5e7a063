"""Loss scaling for fp16 training: a static and a dynamic scaler, written from scratch.

fp16 keeps 5 exponent bits: values below about 6e-8 flush to zero and values above 65504 overflow to inf.
Gradients of a deep network are often tiny, so in fp16 many of them would vanish. Multiplying the loss by a
scale S multiplies every gradient by S (backpropagation is linear in the loss), lifting them into fp16's
range. The optimizer must still see the true gradients, so they are divided by S ("unscaled") before gradient
clipping and the optimizer step. If S is too large some gradient overflows to inf (or an inf - inf makes a
NaN): that step is skipped, since a single inf would destroy the weights.

- `StaticLossScaler` keeps one scale for the whole run: simple, but the right value depends on the model.
- `DynamicLossScaler` searches for it: it multiplies the scale by `backoff_factor` on every overflow and by
  `growth_factor` after `growth_interval` steps in a row without one, so the scale stays close to the largest
  value that does not overflow.

Both take the same calls as `torch.amp.GradScaler`, so a training loop can switch between them:

    scaler = DynamicLossScaler()
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)           # only where you need the true gradients, e.g. to clip them
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        scaler.step(optimizer)               # skipped if any gradient is inf or NaN
        scaler.update()                      # dynamic: back off or grow the scale

Several optimizers may share one scaler: each one is unscaled and stepped on its own, and `update()` backs
off if any of them saw an overflow in this iteration (as `torch.amp.GradScaler` does).

Write it with plain tensor operations: this file must not use `GradScaler` or its private helpers
(`torch._amp_foreach_non_finite_check_and_unscale_`, `torch._amp_update_scale_`).
"""

from __future__ import annotations

import math

import torch


class StaticLossScaler:
    """A fixed loss scale; steps whose gradients hold an inf or NaN are skipped.

    Args:
        scale: the factor the loss is multiplied by; a positive, finite number (powers of two keep scaling and
            unscaling exact).
    """

    def __init__(self, scale: float = 2.0**16) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self._scale = float(scale)
        # One entry per optimizer unscaled since the last update(): id(optimizer) -> whether its gradients
        # held an inf or NaN. step() reads it to skip the step; update() reads it to back off, then clears it.
        self._found_inf: dict[int, bool] = {}

    def get_scale(self) -> float:
        """The current scale."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Return `loss * scale` (a new tensor; calling `.backward()` on it gives gradients times the scale).

        The loss is not modified in place, and its dtype is kept.
        """
        # BEGIN SOLUTION: StaticLossScaler.scale: return the loss multiplied by the current scale
        return loss * self._scale
        # END SOLUTION

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide, in place, the gradients of the optimizer's parameters by the scale; check them for inf/NaN.

        Call it before anything that needs the true gradients (clipping, logging their norm). Parameters whose
        `.grad` is None are skipped. The result is remembered for `step()` and `update()` of this iteration.

        Returns:
            True if every gradient is finite after unscaling (no inf, no NaN), False otherwise.

        Raises:
            RuntimeError: (its message says "already") if `unscale_` was already called for this optimizer
                since the last `update()`: dividing twice would make the gradients wrong.
        """
        # BEGIN SOLUTION: StaticLossScaler.unscale_: divide the grads in place by the scale, record and return whether all are finite
        key = id(optimizer)
        if key in self._found_inf:
            raise RuntimeError(
                "unscale_() was already called for this optimizer since the last update(); "
                "call it at most once per iteration (step() unscales only if you did not)"
            )
        inv_scale = 1.0 / self._scale
        finite_per_device: dict[torch.device, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                param.grad.mul_(inv_scale)
                finite_per_device.setdefault(param.grad.device, []).append(torch.isfinite(param.grad).all())
        # Note: a host-device sync per device; unavoidable, since step() must know now whether to skip.
        all_finite = all(bool(torch.stack(flags).all()) for flags in finite_per_device.values())
        self._found_inf[key] = not all_finite
        return all_finite
        # END SOLUTION

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Call `optimizer.step()` unless the gradients hold an inf or NaN.

        Unscales the gradients first if `unscale_(optimizer)` was not called in this iteration.

        Returns:
            True if the optimizer stepped, False if the step was skipped.
        """
        # BEGIN SOLUTION: StaticLossScaler.step: unscale unless already done, then call optimizer.step() only if all grads are finite
        key = id(optimizer)
        if key not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[key]:
            return False
        optimizer.step()
        return True
        # END SOLUTION

    def update(self) -> None:
        """End the iteration: forget which optimizers were unscaled and stepped. The static scale never changes.

        Raises:
            RuntimeError: (its message says "step") if no optimizer was unscaled or stepped since the last
                `update()`: there is no inf/NaN check to act on.
        """
        # BEGIN SOLUTION: StaticLossScaler.update: check that step() or unscale_() ran since the last update(), then forget that state
        if not self._found_inf:
            raise RuntimeError(
                "update() found no inf/NaN check since the last update(): call step(optimizer) first"
            )
        self._found_inf.clear()
        # END SOLUTION


class DynamicLossScaler(StaticLossScaler):
    """A loss scale that backs off on overflow and grows after a run of good steps (like `torch.amp.GradScaler`).

    Args:
        init_scale: the starting scale; positive and finite.
        growth_factor: the scale is multiplied by it after `growth_interval` good steps in a row; > 1.
        backoff_factor: the scale is multiplied by it after a step with an inf or NaN; in (0, 1).
        growth_interval: the number of good steps in a row (counted by `update()`) that make the scale grow;
            >= 1. A step with an inf or NaN resets the count to zero, and so does growing.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        super().__init__(init_scale)
        if not growth_factor > 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._growth_tracker = 0  # good steps in a row since the last overflow or growth

    def update(self) -> None:
        """End the iteration and adjust the scale.

        If any optimizer's gradients held an inf or NaN in this iteration: scale *= backoff_factor and the count
        of good steps restarts from zero. Otherwise the count goes up by one; when it reaches `growth_interval`,
        scale *= growth_factor and the count restarts from zero. Raises like `StaticLossScaler.update`.
        """
        # BEGIN SOLUTION: DynamicLossScaler.update: back off on inf/NaN, grow after growth_interval good steps in a row
        found_inf = any(self._found_inf.values())
        super().update()
        if found_inf:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
            return
        self._growth_tracker += 1
        if self._growth_tracker == self.growth_interval:
            self._scale *= self.growth_factor
            self._growth_tracker = 0
        # END SOLUTION

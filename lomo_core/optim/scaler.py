"""Dynamic loss scaling for fp16 parameters.

The scale shrinks on an overflow and grows back after ``scale_window`` clean steps in a row, so a
run that overflowed once early does not train at a needlessly small scale for the rest of its life.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


class LossScaleAtMinimumError(RuntimeError):
    """Raised when gradients still overflow at the smallest allowed loss scale."""


@dataclass
class DynamicLossScaler:
    init_scale: float = 2.0**16
    scale_factor: float = 2.0
    scale_window: int = 1000
    min_scale: float = 1.0
    # Number of overflows tolerated at one scale before it is reduced (1: reduce at every overflow).
    delayed_shift: int = 1

    def __post_init__(self) -> None:
        problems = []
        if not self.init_scale > 0:
            problems.append(f"init_scale must be > 0, got {self.init_scale}")
        if not self.scale_factor > 1:
            problems.append(f"scale_factor must be > 1, got {self.scale_factor}")
        if not (isinstance(self.scale_window, int) and self.scale_window >= 1):
            problems.append(f"scale_window must be an integer >= 1, got {self.scale_window!r}")
        if not self.min_scale > 0:
            problems.append(f"min_scale must be > 0, got {self.min_scale}")
        if not (isinstance(self.delayed_shift, int) and self.delayed_shift >= 1):
            problems.append(f"delayed_shift must be an integer >= 1, got {self.delayed_shift!r}")
        if problems:
            raise ValueError("loss_scale_args: " + "; ".join(problems))
        self.scale = float(self.init_scale)
        self.clean_steps = 0
        self.hysteresis = self.delayed_shift
        self.overflows = 0

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> DynamicLossScaler:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(
                f"loss_scale_args: unknown key(s) {unknown}; allowed: {sorted(known)}"
            )
        return cls(**args)

    def update(self, overflow: bool) -> None:
        """Record the outcome of one optimizer step."""
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            if self.hysteresis > 1:
                self.hysteresis -= 1
                return
            if self.scale <= self.min_scale:
                raise LossScaleAtMinimumError(
                    f"gradients overflow even at the minimum loss scale {self.min_scale}; "
                    "the loss is probably NaN/inf or the learning rate too high"
                )
            self.scale = max(self.scale / self.scale_factor, self.min_scale)
            return
        self.clean_steps += 1
        if self.clean_steps % self.scale_window == 0:
            self.scale *= self.scale_factor
            self.hysteresis = self.delayed_shift

    def state_dict(self) -> dict[str, Any]:
        config = asdict(self)
        return {
            **config,
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "hysteresis": self.hysteresis,
            "overflows": self.overflows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("scale", "clean_steps", "hysteresis", "overflows"):
            setattr(self, key, state[key])

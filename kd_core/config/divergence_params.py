"""The divergences by name, with their parameters: the table that params are checked against (`kd validate`)
without importing torch.

Each name here is a function registered under the same name in :mod:`kd_core.losses.divergences` (imported
when a stage runs), which takes its parameters from this table; a test keeps the two name lists equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParamSpec:
    """A scalar hyper-parameter of a divergence: default value and closed interval ``[low, high]``."""

    default: float
    low: float
    high: float

    def check(self, name: str, value: float) -> float:
        """Return ``value`` as float; ``ValueError`` naming the param if outside ``[low, high]`` (or NaN)."""
        v = float(value)
        if not (self.low <= v <= self.high):
            raise ValueError(f"parameter {name!r}={v!r} is outside the allowed interval [{self.low}, {self.high}]")
        return v


# name -> its parameters (what `divergence_args` may set)
DIVERGENCE_PARAMS: dict[str, dict[str, ParamSpec]] = {
    "fkl": {},
    "rkl": {},
    "jsd": {"beta": ParamSpec(default=0.5, low=0.0, high=1.0)},
    "tvd": {},
    "skl": {"alpha": ParamSpec(default=0.1, low=0.0, high=1.0)},
    "srkl": {"alpha": ParamSpec(default=0.1, low=0.0, high=1.0)},
    "akl": {"mu": ParamSpec(default=0.5, low=0.0, high=1.0)},
    # ABKD (Wang et al. 2025): any real alpha, beta in principle; defaults 0.2 / 0.7 (see divergences.abkd)
    "abkd": {"alpha": ParamSpec(default=0.2, low=-5.0, high=5.0), "beta": ParamSpec(default=0.7, low=-5.0, high=5.0)},
}

"""Privacy events: what a task reserves or a round spends, as frozen values (dp_accounting's
``dp_event.py``). Shared by the node's ledger (:mod:`fedgov.node.budget`, :mod:`fedgov.node.ledger`)
and the statistics code (:mod:`fedgov.analytics`), which states the mechanism of each release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedgov.privacy.accounting import HistoryEntry

__all__ = ["Mechanism"]


class Mechanism(BaseModel):
    """What a task reserves, or a round spends: a frozen value object (dp_accounting's DpEvent).

    - ``dpsgd``: ``history`` of ``(noise_multiplier, sample_rate, steps)`` entries, Opacus'
      ``accountant.history`` (Poisson-subsampled Gaussian, Abadi et al. 2016,
      arXiv:1607.00133), evaluated by ``accountant``; ``epsilon`` stays None, ``delta`` 0
      (its delta is whatever the budget leaves after the other mechanisms).
    - ``gaussian``, ``laplace``, ``other``: an already calibrated ``(epsilon, delta)``
      guarantee (``delta`` 0 for pure DP), composed with the rest by basic composition.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dpsgd", "gaussian", "laplace", "other"]
    history: list[tuple[float, float, int]] = Field(default_factory=list)
    epsilon: float | None = None
    delta: float = 0.0
    accountant: Literal["prv", "rdp"] = "prv"

    @model_validator(mode="after")
    def _check(self) -> Mechanism:
        if self.kind == "dpsgd":
            if self.epsilon is not None or self.delta != 0:
                raise ValueError("a dpsgd mechanism is given by its history; leave epsilon and delta unset")
            for sigma, q, steps in self.history:
                if not (math.isfinite(sigma) and sigma > 0):
                    raise ValueError(f"history entry {(sigma, q, steps)}: noise multiplier must be > 0")
                if not 0 < q <= 1:
                    raise ValueError(f"history entry {(sigma, q, steps)}: sample rate must be in (0, 1]")
                if steps < 0:
                    raise ValueError(f"history entry {(sigma, q, steps)}: steps must be >= 0")
        else:
            if self.history:
                raise ValueError(f"a {self.kind} mechanism has no history; give epsilon (and delta)")
            if self.epsilon is None or not (math.isfinite(self.epsilon) and self.epsilon >= 0):
                raise ValueError(f"a {self.kind} mechanism needs a finite epsilon >= 0")
            if not 0 <= self.delta < 1:
                raise ValueError(f"delta must be in [0, 1), got {self.delta}")
        return self

    @classmethod
    def dpsgd(cls, history: Sequence[HistoryEntry], *, accountant: Literal["prv", "rdp"] = "prv") -> Mechanism:
        return cls(kind="dpsgd", history=list(history), accountant=accountant)

    def steps_by_key(self) -> dict[tuple[float, float], int]:
        """DP-SGD steps per ``(noise_multiplier, sample_rate)`` (empty for other kinds)."""
        out: dict[tuple[float, float], int] = {}
        for sigma, q, steps in self.history:
            out[(sigma, q)] = out.get((sigma, q), 0) + steps
        return out

"""Turning a validated frame into model inputs, with every parameter taken from the contract.

In federated learning with differential privacy, preprocessing must not look at the data:

* a scaler fitted on a node's rows (its mean, its max) would differ from node to node, so the
  nodes' models would not speak the same language and averaging them would be meaningless;
* a parameter computed from the data leaks something about that data outside the DP-SGD
  guarantee (a maximum *is* one person's value).

So the :class:`Encoder` is built from the contract alone: numeric bounds for clipping and
scaling, category lists for one-hot encoding, the class order of the target. Every node,
and the coordinator, builds the same encoder from the same contract and gets the same
columns in the same order; :attr:`Encoder.signature` lets them check that cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedgov.config.contract import ColumnType, Contract

__all__ = ["Encoder"]

log = logging.getLogger(__name__)

ENCODING_VERSION = 2
"""Part of :attr:`Encoder.signature`: 2 since numbers are centred into [-1, 1] (1: [0, 1]), so that
encoders of fedgov versions that encode differently never share a signature."""


@dataclass(frozen=True)
class _Feature:
    """How one contract column becomes one or more model inputs."""

    name: str
    type: ColumnType
    nullable: bool
    min: float | None
    max: float | None
    scale: str
    categories: tuple[str, ...]

    def output_names(self) -> list[str]:
        if self.type == ColumnType.CATEGORICAL:
            names = [f"{self.name}={c}" for c in self.categories]
        else:
            names = [self.name]
        if self.nullable:
            names.append(f"{self.name}:missing")
        return names

    def encode(self, series: pd.Series) -> np.ndarray:
        """The ``n x width`` block of this column, float64: a number in [-1, 1], one-hot and boolean
        inputs 0 or 1."""
        if self.type == ColumnType.CATEGORICAL:
            return self._encode_categorical(series)
        try:
            x = series.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"column '{self.name}' is not numeric; pass the typed frame from validate_frame"
            ) from exc
        missing = np.isnan(x)
        self._check_missing(missing)
        if self.type == ColumnType.BOOLEAN:
            bad = ~missing & (x != 0.0) & (x != 1.0)
            if bad.any():
                raise ValueError(
                    f"boolean column '{self.name}' holds {int(bad.sum())} value(s) other than 0/1; "
                    "pass the typed frame from validate_frame"
                )
            value = np.where(missing, 0.0, x)
        else:
            value = self._scale(x, missing)
        cols = [value]
        if self.nullable:
            cols.append(missing.astype(np.float64))
        return np.column_stack(cols)

    def _scale(self, x: np.ndarray, missing: np.ndarray) -> np.ndarray:
        assert self.min is not None and self.max is not None  # the contract guarantees both
        lo, hi = self.min, self.max
        clipped: np.ndarray = np.clip(np.where(missing, lo, x), lo, hi)
        if hi == lo:
            return np.zeros_like(clipped)
        if self.scale == "log":
            # log1p(x - min) rather than log(x): defined at x = min (0 for amounts of money)
            # and maps [min, max] onto [0, 1] exactly like the linear case does.
            out: np.ndarray = np.log1p(clipped - lo) / np.log1p(hi - lo)
        else:
            out = (clipped - lo) / (hi - lo)
        out = np.clip(out, 0.0, 1.0)  # rounding must not step outside [0, 1]
        # Centred into [-1, 1]: a logistic regression trained by SGD from zero learns a feature that
        # is all positive slowly, its weight and the bias moving together (Chem97 under distributed
        # DP: 0.342 in [0, 1], 0.350 centred; benchmarks/bench_utility.py). A missing value is 0,
        # the middle, with its own <name>:missing input.
        out = 2.0 * out - 1.0
        out[missing] = 0.0
        return out

    def _encode_categorical(self, series: pd.Series) -> np.ndarray:
        values = series.to_numpy(dtype=object)
        missing = pd.isna(values).astype(bool)
        self._check_missing(missing)
        codes = pd.Categorical(values, categories=list(self.categories)).codes.astype(np.int64)
        unknown = (codes < 0) & ~missing
        if unknown.any():
            raise ValueError(
                f"column '{self.name}' holds {int(unknown.sum())} value(s) outside the contract's "
                "categories; pass the typed frame from validate_frame"
            )
        k = len(self.categories)
        out = np.zeros((len(values), k + (1 if self.nullable else 0)), dtype=np.float64)
        rows = np.flatnonzero(codes >= 0)
        out[rows, codes[rows]] = 1.0
        if self.nullable:
            out[missing, k] = 1.0
        return out

    def _check_missing(self, missing: np.ndarray) -> None:
        if not self.nullable and missing.any():
            raise ValueError(
                f"column '{self.name}' has {int(missing.sum())} missing value(s) but the contract "
                "says it is not nullable; pass the typed frame from validate_frame"
            )


@dataclass(frozen=True)
class Encoder:
    """Maps a validated frame to ``(X, y)`` using only the contract's parameters.

    * integer and float columns: clipped to ``[min, max]``, then scaled to ``[0, 1]``,
      linearly or, with ``scale = "log"``, as ``log1p(x - min) / log1p(max - min)``, and
      centred into ``[-1, 1]`` (``2 s - 1``); a missing value becomes 0 (the middle) and, for a
      nullable column, sets a ``<name>:missing`` input;
    * categorical columns: one-hot over the contract's categories, in the contract's order,
      plus a ``<name>:missing`` slot when the column is nullable;
    * boolean columns: 0/1, with a ``<name>:missing`` input when nullable;
    * the target (categorical): the index of its value in the contract's category order.

    Build one with :meth:`from_contract`; never from data.
    """

    contract_ref: str
    features: tuple[str, ...]
    target: str | None
    classes: tuple[str, ...]
    _specs: tuple[_Feature, ...]

    @classmethod
    def from_contract(cls, contract: Contract, features: list[str] | None = None) -> Encoder:
        """The encoder for ``features`` (default: the contract's feature columns) and target.

        Raises :class:`ValueError` for a feature that is not in the contract, is the target
        or the person id, or is a free-text (string) column.
        """
        names = contract.feature_names(features)
        known = set(contract.names())
        bad: list[str] = []
        for name in names:
            if name not in known:
                bad.append(f"'{name}' is not a column of {contract.ref}")
            elif name == contract.target:
                bad.append(f"'{name}' is the target")
            elif name == contract.person_id:
                bad.append(f"'{name}' is the person id")
            elif contract.column(name).type == ColumnType.STRING:
                bad.append(f"'{name}' is free text")
        if len(set(names)) != len(names):
            bad.append("a feature is named twice")
        if bad:
            raise ValueError(f"cannot encode features for {contract.ref}: {'; '.join(bad)}")
        specs = []
        for name in names:
            col = contract.column(name)
            specs.append(
                _Feature(
                    name=name,
                    type=col.type,
                    nullable=col.nullable,
                    min=col.min,
                    max=col.max,
                    scale=col.scale,
                    categories=tuple(col.categories or ()),
                )
            )
        classes: tuple[str, ...] = ()
        if contract.target is not None:
            classes = tuple(contract.column(contract.target).categories or ())
        return cls(contract.ref, tuple(names), contract.target, classes, tuple(specs))

    @property
    def feature_names(self) -> list[str]:
        """The names of the model's inputs, one per column of ``X``, in order."""
        return [n for spec in self._specs for n in spec.output_names()]

    @property
    def n_features(self) -> int:
        """The width of ``X``."""
        return len(self.feature_names)

    @property
    def n_classes(self) -> int:
        """The number of target classes (0 when the contract names no target)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The target's categories; class ``i`` of ``y`` is ``class_names[i]``."""
        return list(self.classes)

    @property
    def columns(self) -> list[str]:
        """The input columns the encoder reads: the features, then the target if any."""
        return list(self.features) + ([self.target] if self.target is not None else [])

    @property
    def signature(self) -> str:
        """A short hash of everything that determines the encoding.

        Two encoders with the same signature map the same row to the same vector, so nodes
        and coordinator can check that they agree without exchanging any data.
        """
        spec = {
            "encoding": ENCODING_VERSION,
            "contract": self.contract_ref,
            "features": [
                [s.name, s.type.value, s.nullable, s.min, s.max, s.scale, list(s.categories)]
                for s in self._specs
            ],
            "target": self.target,
            "classes": list(self.classes),
        }
        blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def transform_features(self, df: pd.DataFrame) -> np.ndarray:
        """``X``: float32, ``len(df) x n_features``, every value in [-1, 1]."""
        missing = [f for f in self.features if f not in df.columns]
        if missing:
            raise ValueError(f"frame lacks feature column(s) {missing}")
        n = len(df)
        if not self._specs:
            return np.zeros((n, 0), dtype=np.float32)
        blocks = [spec.encode(df[spec.name]) for spec in self._specs]
        return np.concatenate(blocks, axis=1).astype(np.float32, copy=False)

    def transform_target(self, df: pd.DataFrame) -> np.ndarray:
        """``y``: int64 class indices in the contract's category order."""
        if self.target is None:
            raise ValueError(f"contract {self.contract_ref} names no target column")
        if self.target not in df.columns:
            raise ValueError(f"frame lacks the target column '{self.target}'")
        values = df[self.target].to_numpy(dtype=object)
        codes: np.ndarray = pd.Categorical(values, categories=list(self.classes)).codes.astype(np.int64)
        bad = codes < 0
        if bad.any():
            raise ValueError(
                f"target '{self.target}' holds {int(bad.sum())} missing or unknown value(s); "
                "pass the typed frame from validate_frame"
            )
        return codes

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` for a typed frame from :func:`~fedgov.data.validate_frame`."""
        return self.transform_features(df), self.transform_target(df)

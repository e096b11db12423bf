"""A cheap surrogate that screens children before any tuning (AutoQRA, METHOD.md stage 2).

Ridge regression (scikit-learn) on :meth:`SearchSpace.encode` features, fitted on the
low-fidelity scores measured so far. It only *orders* candidates for screening; it never
stands in for a measurement in the front or the chosen config.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV

from edgeqra.space import Config, SearchSpace

__all__ = ["Surrogate"]

MIN_POINTS = 6  # below this a fit is noise; the caller screens at random instead


class Surrogate:
    """Fit on (config, score) pairs, predict scores of unseen configs; seeded and stateless."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self._model: RidgeCV | None = None

    def _features(self, configs: Sequence[Config]) -> np.ndarray:
        return np.asarray([self.space.encode(c) for c in configs], dtype=np.float64)  # (n, 2L)

    def fit(self, configs: Sequence[Config], scores: Sequence[float]) -> bool:
        """Fit when there are enough points; returns whether a model is ready."""
        if len(configs) < MIN_POINTS:
            self._model = None
            return False
        self._model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(
            self._features(configs), np.asarray(scores, dtype=np.float64)
        )
        return True

    @property
    def ready(self) -> bool:
        """A model has been fitted."""
        return self._model is not None

    def predict(self, configs: Sequence[Config]) -> np.ndarray:
        """Predicted score per config (higher is better)."""
        if self._model is None:
            raise RuntimeError("Surrogate.predict before a successful fit")
        return self._model.predict(self._features(configs))

    def rank_correlation(self, configs: Sequence[Config], scores: Sequence[float]) -> float:
        """Spearman ρ between predictions and measured scores (how much to trust screening)."""
        if self._model is None or len(configs) < 3:
            return float("nan")
        return float(spearmanr(self.predict(configs), scores).statistic)

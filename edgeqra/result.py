"""One evaluation's outcome (:class:`Result`), the record the search, its journal and the
executors pass around; a leaf with no torch or peft import, so the search's pure parts
(evolution, Bayesian refinement, journal, driver) load without them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Result"]


@dataclass(frozen=True)
class Result:
    """One evaluation of one config at one fidelity: what the journal records."""

    config: str
    fidelity: int
    score: float  # higher is better: accuracy, or -loss for the loss metric
    metric: str
    loss: float
    perplexity: float
    accuracy: float | None
    accuracy_norm: float | None
    train_loss: float | None  # mean of the last quarter of the training losses
    memory_bytes: int | None  # predicted by the memory model (None when not asked)
    fits: bool | None  # within the profile's budget (None without a profile)
    seconds: float
    seed: int

    def to_json(self) -> dict[str, object]:
        """JSON-ready dict."""
        return dict(self.__dict__)

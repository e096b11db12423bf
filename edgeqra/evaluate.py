"""Evaluate one candidate end to end: attach its per-unit LoRA, tune N steps, score.

``Evaluator.evaluate(config, fidelity)`` is what the search calls for every candidate (METHOD.md,
"Evaluation of one candidate"): the bank's dequantized base at the config's bits, the
adapters of :mod:`edgeqra.tune` trained for ``fidelity`` steps, and the held-out score of
:mod:`edgeqra.scoring` (or the fast engine, :mod:`edgeqra.engine`, where it applies).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgeqra.bank import Bank
from edgeqra.data import TaskData, tokenize_examples
from edgeqra.device import model_device
from edgeqra.engine import EngineSettings, GraphLoRA, engine_supports
from edgeqra.errors import ConfigError
from edgeqra.models import LoadedModel
from edgeqra.result import Result
from edgeqra.scoring import Scores, score_task
from edgeqra.settings import setting
from edgeqra.space import Config
from edgeqra.tune import TrainBatches, TuneSettings, detach_lora, tune

__all__ = ["METRICS", "EvalSettings", "Evaluator", "Result", "score_value"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one candidate, end to end


_AUTO_METRIC = {  # lm-eval's headline metric per task; text sources use the held-out loss
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "openbookqa": "acc_norm",
    "boolq": "acc",
    "winogrande": "acc",
}
METRICS = ("auto", "acc", "acc_norm", "loss")
ENGINES = ("auto", "graph", "eager")
"""Tuning engines: the captured padded-rank engine (``graph``; eager padded steps on CPU),
the eager PEFT reference (``eager``), or ``auto`` (graph on a GPU, eager on a CPU)."""


@dataclass(frozen=True)
class EvalSettings:
    """What a candidate is scored on; with TuneSettings it fixes evaluate() completely."""

    n_train: int | None = setting(  # None = all
        512, help="train examples (a seeded prefix of the task's train split)", key="data.n_train"
    )
    n_eval: int | None = setting(200, help="held-out items / documents", key="data.n_eval")
    seq_len: int = setting(
        256, help="tokens per training row and text-scoring window", key="data.seq_len"
    )
    metric: str = setting(
        "auto",
        help="the score: acc, acc_norm, loss, or auto (lm-eval's headline metric of the task)",
        key="data.metric",
        choices=METRICS,
    )
    eval_batch_size: int | None = None  # pairs per forward; None: 256 on a GPU, 16 on a CPU

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"`metric` {self.metric!r} is not one of {list(METRICS)}")
        for name in ("n_train", "n_eval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):  # fmt: skip
                raise ConfigError(f"`{name}` must be an integer >= 1, got {value!r}")
        if self.seq_len < 8:
            raise ConfigError(f"`seq_len` {self.seq_len} is too short; use 128 or more")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"`eval_batch_size` must be >= 1, got {self.eval_batch_size}")

    def metric_for(self, task: TaskData) -> str:
        """The metric actually used for a task (resolves ``auto``)."""
        if task.kind == "text":
            return "loss"
        return _AUTO_METRIC.get(task.name, "acc") if self.metric == "auto" else self.metric


def score_value(scores: Scores, metric: str) -> float:
    """Higher-is-better score of a metric."""
    if metric == "loss":
        return -scores.loss
    value = scores.accuracy if metric == "acc" else scores.accuracy_norm
    if value is None:
        raise ConfigError(f"metric `{metric}` needs a multiple-choice task; use `loss`")
    return value


class Evaluator:
    """evaluate(config, fidelity): assemble from the bank, attach LoRA, tune, score.

    One model object is reused: ``Bank.assemble`` overwrites every unit's weights and
    ``detach_lora`` removes the adapters, so each call starts from the same state and the
    same call gives the same numbers (seeded LoRA init, fixed data order).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        task: TaskData,
        bank: Bank | None,
        tune_settings: TuneSettings,
        eval_settings: EvalSettings = EvalSettings(),
        *,
        memory: Callable[[Config], tuple[int, bool | None]] | None = None,
        progress: bool = False,
        engine: str = "auto",
        max_rank: int = 32,
    ) -> None:
        self.loaded = loaded
        self.task = task
        self.bank = bank
        self.tune_settings = tune_settings
        self.eval_settings = eval_settings
        self.memory = memory
        self.progress = progress
        self.metric = eval_settings.metric_for(task)
        if engine not in ENGINES:
            raise ConfigError(f"`engine` {engine!r} is not one of {list(ENGINES)}")
        self.engine = engine
        self.max_rank = max_rank
        self._graph: GraphLoRA | None = None
        if bank is not None:
            bank.remember_originals(loaded.model)
        self.batches = TrainBatches(
            *tokenize_examples(loaded.tokenizer, task.train, eval_settings.seq_len)
        )

    def score(self, model: nn.Module) -> Scores:
        """Score any model of this evaluator's tokenizer on its task's held-out split."""
        return score_task(
            model,
            self.loaded.tokenizer,
            self.task,
            batch_size=self.eval_settings.eval_batch_size,
            **({"seq_len": self.eval_settings.seq_len} if self.task.kind == "text" else {}),
        )

    def _graph_engine(self, config: Config, settings: TuneSettings) -> GraphLoRA | None:
        """The captured engine for this call, or None for the eager reference path.

        ``auto`` takes the engine on a GPU when the settings allow it; a config whose rank is
        above the padded width rebuilds it wider. Switching to the eager path unloads it.
        """
        wanted = self.engine == "graph" or (
            self.engine == "auto" and model_device(self.loaded.model).type == "cuda"
        )
        top = max((c.rank for c in config), default=0)
        if not wanted or not engine_supports(settings):
            self.close()
            return None
        if self._graph is not None and (
            top > self._graph.settings.max_rank or self._graph.alpha_ratio != settings.alpha_ratio
        ):
            self.close()
        if self._graph is None:
            self._graph = GraphLoRA(
                self.loaded.model,
                self.loaded.units,
                settings.alpha_ratio,
                EngineSettings(max_rank=max(self.max_rank, top, 1)),
            )
        return self._graph

    def close(self) -> None:
        """Unload the engine's adapters so ``loaded.model`` is the bare base model again."""
        if self._graph is not None:
            self._graph.close()
            self._graph = None

    def evaluate(
        self, config: Config, fidelity: int, *, save_adapter: Path | None = None
    ) -> Result:
        """Score ``config`` after ``fidelity`` tuning steps (a pure function of its inputs).

        ``save_adapter``: also write the trained PEFT adapter folder there (the final stage);
        nothing is written when every rank is 0.
        """
        start = time.perf_counter()
        model = self.loaded.model
        if any(c.bits < 16 for c in config) and self.bank is None:
            raise ConfigError(f"config {config.short()} quantizes units but no bank was built")
        if self.bank is not None:
            self.bank.assemble(model, config)
        settings = dataclasses.replace(self.tune_settings, steps=fidelity)
        graph = self._graph_engine(config, settings)
        if graph is not None:
            log_ = graph.train(config, self.batches, settings)
            if save_adapter is not None:
                graph.save_adapter(config, settings, save_adapter)
            scores = self.score(graph.model)
        else:
            tuned, log_ = tune(
                model, self.loaded.units, config, self.batches, settings, progress=self.progress
            )
            try:
                if save_adapter is not None and hasattr(tuned, "peft_config"):
                    tuned.save_pretrained(str(save_adapter))
                scores = self.score(tuned)
            finally:
                detach_lora(tuned)
        memory_bytes, fits = self.memory(config) if self.memory else (None, None)
        tail = log_.losses[-max(1, len(log_.losses) // 4) :]
        return Result(
            config=str(config),
            fidelity=fidelity,
            score=score_value(scores, self.metric),
            metric=self.metric,
            loss=scores.loss,
            perplexity=scores.perplexity,
            accuracy=scores.accuracy,
            accuracy_norm=scores.accuracy_norm,
            train_loss=sum(tail) / len(tail) if tail else None,
            memory_bytes=memory_bytes,
            fits=fits,
            seconds=time.perf_counter() - start,
            seed=self.tune_settings.seed,
        )

"""The job dataclasses: what fixes an evaluation (:class:`EvalJob`) and a whole search
(:class:`SearchJob`, the run directory's ``job.json``).

Apart from :mod:`edgeqra.pipeline`, which runs them, so that the run directory
(:mod:`edgeqra.rundir`), the job files (:mod:`edgeqra.job`) and the CLI can name a job
without importing the stages; :mod:`edgeqra.pipeline` re-exports both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeqra import settings as schema
from edgeqra.errors import ConfigError
from edgeqra.evaluate import EvalSettings
from edgeqra.search.driver import SearchSettings
from edgeqra.search.executors import ExecutorSettings
from edgeqra.settings import setting
from edgeqra.space import DEFAULT_BITS, DEFAULT_RANKS, FP16_BITS, SearchSpace
from edgeqra.tune import TuneSettings

__all__ = ["EvalJob", "SearchJob"]


@dataclass(frozen=True)
class EvalJob:
    """Everything that fixes an evaluation: model, data, bank and tuning settings."""

    model: str = setting(
        "smollm2", help="`smollm2` (embedded), a HF folder or a .gguf file", key="model"
    )
    task: str = setting(
        "arc_easy",
        help="arc_easy, arc_challenge, boolq, piqa, hellaswag, winogrande, openbookqa, c4, "
        "wiki, … or a .txt/.jsonl file",
        key="task",
    )
    bits: tuple[int, ...] = setting(  # the search space Q (the bank is built for what is used)
        DEFAULT_BITS, help="allowed bit-widths Q", key="space.bits"
    )
    ranks: tuple[int, ...] = setting(DEFAULT_RANKS, help="allowed ranks R", key="space.ranks")
    group_size: int = setting(
        64, help="GPTQ group size (-1: one group per row)", key="data.group_size"
    )
    calibration: str = "c4"
    calib_samples: int = setting(  # GPTQModel wants >= 256 for best quality; 32 keeps CPU short
        32, help="GPTQ calibration rows of 256 tokens", key="data.calib_samples"
    )
    calib_seq_len: int = 256
    tune: TuneSettings = field(default_factory=TuneSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    device: str = setting("auto", help="auto, cpu or cuda[:N]", key="device")
    profile: str | None = setting(
        None,
        help="device profile name or .toml path: the hard memory budget (evaluate: checked)",
        key="profile",
    )
    trust_remote_code: bool = setting(
        False, help="allow the model's custom code", key="trust_remote_code"
    )

    def __post_init__(self) -> None:
        SearchSpace(1, self.bits, self.ranks)  # the bit and rank sets, before any model loads
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs >= 1):
            raise ConfigError(
                f"`group_size` must be a positive integer (or -1 for one group per row), got "
                f"{gs!r}; GPTQ's usual sizes are 32, 64 and 128"
            )
        n = self.calib_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"`calib_samples` must be an integer >= 1, got {n!r}")


@dataclass(frozen=True)
class SearchJob:
    """A whole search: what to evaluate, how to search, where the run directory goes."""

    eval: EvalJob
    search: SearchSettings = field(default_factory=SearchSettings)
    budget_gb: float | None = setting(
        None, help="override the profile's usable budget (GiB)", key="budget_gb"
    )
    budget_bits: float | None = setting(
        None,
        help="budget = the predicted memory of a rank-8 config averaging B bits (e.g. 3.5)",
        key="budget_bits",
        metavar="B",
    )
    baseline_rank: int = setting(  # seeded and reported
        8, help="rank of the uniform baselines", key="search.baseline_rank"
    )
    final_steps: int | None = setting(  # None = search.steps
        None, help="tuning steps of the chosen config (default: --steps)", key="tuning.final_steps"
    )
    alpha: float | None = setting(  # α·norm(score) − (1−α)·norm(memory); None = best score
        None, help="pick the front's trade-off point α·score−(1−α)·memory", key="search.alpha"
    )
    baselines: bool = setting(  # at full length
        True, help="score the uniform baselines that fit, for the summary", key="search.baselines"
    )
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)  # where evaluations run

    def __post_init__(self) -> None:
        if self.eval.profile is None:
            raise ConfigError("a search needs a device profile; pass `--profile NAME`")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"`alpha` must be in [0, 1], got {self.alpha}")
        if self.budget_gb is not None and self.budget_bits is not None:
            raise ConfigError(
                "give the budget once: `budget_gb` or `budget_bits`, not both; drop one of them"
            )
        if self.budget_bits is not None:
            ladder = sorted({*self.eval.bits, FP16_BITS})
            ok = isinstance(self.budget_bits, int | float) and not isinstance(
                self.budget_bits, bool
            )
            if not ok or not ladder[0] <= self.budget_bits <= FP16_BITS:
                raise ConfigError(
                    f"`budget_bits` {self.budget_bits!r} must be a number in [{ladder[0]}, "
                    f"{FP16_BITS}] (the bit set {list(self.eval.bits)} up to unquantized), e.g. 3.5"
                )
        if self.budget_gb is not None and not self.budget_gb > 0:
            raise ConfigError(f"`budget_gb` must be positive, got {self.budget_gb}")
        if self.baseline_rank not in self.eval.ranks:
            raise ConfigError(
                f"`baseline_rank` {self.baseline_rank} is not in the rank set "
                f"{list(self.eval.ranks)}; pick one of those"
            )

        if self.final_steps is not None and (
            isinstance(self.final_steps, bool) or not isinstance(self.final_steps, int)
            or self.final_steps < 0
        ):  # fmt: skip
            raise ConfigError(f"`final_steps` must be an integer >= 0, got {self.final_steps!r}")

    @classmethod
    def from_values(cls, values: Mapping[str, object]) -> SearchJob:
        """Build from setting values by key (a job file's, the CLI's; :mod:`edgeqra.settings`).

        A trade-off point (``search.alpha``) needs the whole front, so it implies
        ``search.front``.
        """
        values = dict(values)
        if values.get("search.alpha") is not None:
            values["search.front"] = True
        return schema.build(cls, values)

    def to_json(self) -> dict[str, object]:
        """JSON-ready (the run directory's job.json; ``from_json`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchJob:
        """Rebuild from :meth:`to_json` output, also one written before issue 19 (old names)."""
        return schema.from_tree(cls, _upgrade_job_json(data))


# job.json before issue 19: renamed search settings, and the seed and steps stored more than
# once (search.seed, search.bayes.seed, eval.tune.steps: now one `seed` and `search.steps`).
_RENAMED = {"max_evals": "evals", "n_rungs": "rungs", "use_sensitivity": "sensitivity"}


def _upgrade_job_json(data: dict) -> dict:
    """A job.json of any edgeqra version in today's field names (a copy)."""
    data = json.loads(json.dumps(data))
    search = data.get("search", {})
    for old, new in _RENAMED.items():
        if old in search:
            search[new] = search.pop(old)
    search.pop("seed", None)
    search.get("bayes", {}).pop("seed", None)
    data.get("eval", {}).get("tune", {}).pop("steps", None)  # set per evaluation
    return data

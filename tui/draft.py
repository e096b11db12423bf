"""The TUI's one piece of state: a draft job file (the mapping :mod:`edgeqra.job` reads and
writes), its defaults and the helpers the screens set and read settings with."""

from __future__ import annotations

from typing import Any

from edgeqra.job import default_mapping

__all__ = ["DEFAULT_DRAFT", "QUICKSTART", "default_draft", "get_setting", "put_setting"]

# The quick-start's settings (examples/quickstart.toml without its profile): a search that
# finishes in minutes on a CPU, a sensible first run from the TUI.
QUICKSTART: dict[str, Any] = {
    "out": "runs/tui",
    "data": {"n_train": 256, "n_eval": 40, "calib_samples": 16},
    "tuning": {"steps": 8},
    "search": {"evals": 16, "population": 4, "children": 4, "generations": 1},
}


def default_draft() -> dict[str, Any]:
    """Every setting's default (the settings schema's, through :func:`edgeqra.job.default_mapping`)
    with the quick-start's values over them; no profile yet, no ``[prune]``."""
    draft = default_mapping()
    for key, value in QUICKSTART.items():
        if isinstance(value, dict):
            draft.setdefault(key, {}).update(value)
        else:
            draft[key] = value
    return draft


DEFAULT_DRAFT: dict[str, Any] = default_draft()  # as at import; the app builds its own


def get_setting(draft: dict[str, Any], key: str) -> Any:
    """The draft's value of setting ``key`` (``table.name`` or a top-level name), or None."""
    table, _, name = key.rpartition(".")
    return (draft.get(table) or {} if table else draft).get(name)


def put_setting(draft: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` in the draft; ``None`` removes it, and with it an optional table such as
    ``[prune]`` (not in the defaults: its first field is its switch)."""
    table, _, name = key.rpartition(".")
    if value is not None:
        (draft.setdefault(table, {}) if table else draft)[name] = value
    elif table and table not in default_mapping():
        draft.pop(table, None)
    else:
        (draft.get(table, {}) if table else draft).pop(name, None)

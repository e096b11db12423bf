"""One declarative schema for every user setting (issue 19).

A setting is a field of a frozen settings dataclass (:class:`~edgeqra.tune.TuneSettings`,
:class:`~edgeqra.search.driver.SearchSettings`, :class:`~edgeqra.jobs.SearchJob`, …)
declared with :func:`setting`, whose ``metadata`` holds its help text, its job-file key
(``table.key``, or a bare key at the top of the file) and its CLI flag. Nested settings
dataclasses are found through the fields' type annotations, so the dataclass tree is the
registry: :func:`settings_of` walks it, and everything a user sees is generated from that walk:

- the CLI's options (:func:`add_options`, values read back with :func:`given`),
- job-file reading and validation (:func:`flatten`, :func:`check_type`) and writing
  (:func:`to_mapping`),
- building the dataclasses from values by key (:func:`build`) and from ``job.json``
  (:func:`from_tree`),
- the TUI's draft (:func:`defaults_mapping`) and the names in "resumed under different
  settings" refusals (:func:`differences`).

Fields without ``key`` metadata are internal knobs (their defaults, stored in ``job.json``).
Validation stays in each dataclass's ``__post_init__``: a bad value fails while the settings
are built, before any model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from edgeqra.errors import ConfigError

__all__ = [
    "Setting",
    "add_options",
    "build",
    "check_type",
    "defaults_mapping",
    "differences",
    "flatten",
    "from_tree",
    "given",
    "setting",
    "settings_of",
    "to_mapping",
    "value_of",
]


def setting(
    default: Any = MISSING,
    *,
    help: str,
    key: str,
    flag: str | None = "",
    choices: Iterable[object] | None = None,
    default_factory: Any = MISSING,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is a user setting.

    Args:
        default: the default (the CLI's and the job file's).
        help: one line for ``--help`` and the TUI.
        key: the job-file key, ``table.name`` or ``name`` at the top; two fields with one key
            are one setting (the job's ``seed`` seeds the tuning and the pruning).
        flag: the CLI flag; ``""`` derives ``--name`` from the key, ``None`` means job file only.
        choices: allowed values (the CLI checks them; ``__post_init__`` checks the rest).
        default_factory: as in :func:`dataclasses.field`.
        metavar: the CLI's placeholder.
    """
    if flag == "":
        flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
    metadata = {
        "help": help,
        "key": key,
        "flag": flag,
        "choices": tuple(choices) if choices is not None else None,
        "metavar": metavar,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class Setting:
    """One user setting found in the dataclass tree."""

    key: str  # job-file key, e.g. "search.evals"
    path: tuple[str, ...]  # attribute path from the root, e.g. ("search", "evals")
    kind: type  # int, float, str, bool, Path, an Enum, or tuple (see `item`)
    item: type | None  # the element type of a tuple setting
    optional: bool  # None allowed ("not set")
    default: Any  # MISSING when required
    help: str
    flag: str | None
    choices: tuple[object, ...] | None
    metavar: str | None

    @property
    def name(self) -> str:
        """The attribute name."""
        return self.path[-1]

    def describe(self) -> str:
        """``a number``, ``a list of integers``, … for messages."""
        return _type_name(self.kind, self.item)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _nested(hint: Any) -> type | None:
    """The settings dataclass a field holds, if any."""
    base, _ = _unwrap(hint)
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def settings_of(cls: type, prefix: tuple[str, ...] = ()) -> list[Setting]:
    """Every setting of ``cls`` and its nested settings dataclasses, in declaration order."""
    hints = typing.get_type_hints(cls)
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            base, optional = _unwrap(hints[f.name])
            item = None
            if typing.get_origin(base) is tuple:
                item, base = typing.get_args(base)[0], tuple
            m = f.metadata
            out.append(
                Setting(
                    m["key"],
                    (*prefix, f.name),
                    base,
                    item,
                    optional,
                    _default(f),
                    m["help"],
                    m["flag"],
                    m["choices"],
                    m["metavar"],
                )
            )
        elif (sub := _nested(hints[f.name])) is not None:
            out.extend(settings_of(sub, (*prefix, f.name)))
    return out


# ----------------------------------------------------------------------------- values


def _type_name(kind: type, item: type | None = None) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false"}
    if kind is tuple:
        inner = {int: "integers", float: "numbers", str: "strings"}.get(item, "values")  # type: ignore[arg-type]
        return f"a list of {inner}"
    return names.get(kind, "a string")


def _is(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str)  # str, Path and str enums are strings in a file


def check_type(s: Setting, value: object) -> object:
    """``value`` (from a job file) if it has the setting's type (ints pass as floats), as
    the field takes it; else a ConfigError naming the key and the fix."""
    if s.kind is tuple:
        ok = isinstance(value, list) and all(_is(v, s.item) for v in value)  # type: ignore[arg-type]
    else:
        ok = _is(value, s.kind)
    if not ok:
        raise ConfigError(
            f"`{s.key}` must be {s.describe()}, got {value!r}; fix it in the job file"
        )
    return _coerce(s, value)


def _coerce(s: Setting, value: object) -> object:
    """A file or CLI value as the field holds it (lists -> tuples, ints -> floats, paths)."""
    if value is None:
        return None
    if s.kind is tuple:
        return tuple(float(v) if s.item is float else v for v in value)  # type: ignore[union-attr]
    if s.kind is float:
        return float(value)  # type: ignore[arg-type]
    if s.kind is Path:
        return Path(value)  # type: ignore[arg-type]
    return value


def _plain(value: object) -> object:
    """A field's value as a job file or JSON holds it (tuples -> lists, enums, paths)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return value


def value_of(obj: object, s: Setting) -> object:
    """The setting's value in a built dataclass tree (``None`` under an absent table)."""
    for name in s.path:
        if obj is None:
            return None
        obj = getattr(obj, name)
    return obj


def build(cls: type, values: Mapping[str, object]) -> Any:
    """``cls`` built from setting values by key; settings not in ``values`` keep defaults.

    Nested settings dataclasses are built first (their ``__post_init__`` validates them),
    through their ``from_values`` classmethod where they have one; an optional one
    (``PruneSettings | None``) only when one of its own table keys is given.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if "key" in f.metadata:
            if f.metadata["key"] in values:
                kwargs[f.name] = values[f.metadata["key"]]
        elif (sub := _nested(hints[f.name])) is not None:
            if _unwrap(hints[f.name])[1]:  # an optional table: present if its keys are
                own = {s.key for s in settings_of(sub) if "." in s.key}
                if not own & set(values):
                    continue
            # A class may derive values first (SearchJob.from_values: alpha implies front).
            make = getattr(sub, "from_values", None)
            kwargs[f.name] = make(values) if make is not None else build(sub, values)
    return cls(**kwargs)


def from_tree(cls: type, data: Mapping[str, Any], where: str = "job.json") -> Any:
    """``cls`` from its :func:`dataclasses.asdict` form (``job.json``), all fields by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown field `{unknown[0]}` in {cls.__name__}; the run directory was "
            "written by another edgeqra version"
        )
    kwargs: dict[str, object] = {}
    for name, value in data.items():
        base, _ = _unwrap(hints[name])
        if value is not None and (sub := _nested(base)) is not None:
            value = from_tree(sub, value, where)
        elif value is not None and typing.get_origin(base) is tuple:
            value = tuple(value)
        elif value is not None and base is Path:
            value = Path(value)
        kwargs[name] = value
    return cls(**kwargs)


def differences(a: object, b: object, root: type) -> list[tuple[Setting, object, object]]:
    """The settings whose values differ between two trees of ``root``."""
    out = []
    for s in settings_of(root):
        va, vb = _plain(value_of(a, s)), _plain(value_of(b, s))
        if va != vb:
            out.append((s, va, vb))
    return out


# ----------------------------------------------------------------------------- job files


def _tables(schema: list[Setting]) -> list[str]:
    return sorted({s.key.split(".")[0] for s in schema if "." in s.key})


def flatten(data: Mapping[str, Any], schema: list[Setting]) -> dict[str, object]:
    """``{"search": {"evals": 8}}`` -> ``{"search.evals": 8}``, type-checked; unknown keys
    and tables are refused with the nearest known name."""
    tables = _tables(schema)
    by_key = {s.key: s for s in schema}
    flat: dict[str, object] = {}
    for name, value in data.items():
        if name in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"`{name}` must be a table (`[{name}]`), got {value!r}")
            for sub, v in value.items():
                flat[f"{name}.{sub}"] = v
        elif isinstance(value, dict):
            near = difflib.get_close_matches(name, tables, n=1)
            hint = f"did you mean `[{near[0]}]`?" if near else f"tables: {', '.join(tables)}"
            raise ConfigError(f"unknown table `[{name}]` in the job file; {hint}")
        else:
            flat[name] = value
    for key in flat:
        if key not in by_key:
            near = difflib.get_close_matches(key, list(by_key), n=1)
            hint = f"did you mean `{near[0]}`?" if near else f"known keys: {', '.join(by_key)}"
            raise ConfigError(f"unknown key `{key}` in the job file; {hint}")
    return {key: check_type(by_key[key], value) for key, value in flat.items()}


def _nest(values: Mapping[str, object]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            table, sub = key.split(".", 1)
            data.setdefault(table, {})[sub] = value
        else:
            data[key] = value
    return data


def to_mapping(obj: object, root: type) -> dict[str, Any]:
    """The job file's content for a built tree (inverse of :func:`flatten` + :func:`build`);
    ``None``s are left out, a key shared by two fields is written once."""
    values: dict[str, object] = {}
    for s in settings_of(root):
        value = value_of(obj, s)
        if value is not None and s.key not in values:
            values[s.key] = _plain(value)
    return _nest(values)


def defaults_mapping(root: type, *, skip_optional_tables: bool = True) -> dict[str, Any]:
    """Every setting's default as a job mapping (``None`` and required ones left out);
    optional tables (``[prune]``) are left out unless asked for."""
    hints = typing.get_type_hints(root)
    optional = {
        f.name
        for f in dataclasses.fields(root)
        if _nested(hints[f.name]) is not None and _unwrap(hints[f.name])[1]
    }
    values: dict[str, object] = {}
    for s in settings_of(root):
        if skip_optional_tables and s.path[0] in optional:
            continue
        if s.default is not MISSING and s.default is not None and s.key not in values:
            values[s.key] = _plain(s.default)
    return _nest(values)


# ----------------------------------------------------------------------------- the CLI


def _int_list(text: str) -> tuple[int, ...]:
    """``"2,3,4,8"`` -> (2, 3, 4, 8) for argparse."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_options(
    parser: argparse.ArgumentParser,
    schema: Iterable[Setting],
    *,
    required: Iterable[str] = (),
    show_defaults: bool = True,
) -> None:
    """One option per setting with a flag; each stores under its key only when given
    (:func:`given` reads them), so a command can tell "given" from "default"."""
    required = set(required)
    seen: set[str] = set()
    for s in schema:
        if s.flag is None or s.key in seen:
            continue
        seen.add(s.key)
        help_ = s.help
        default = _plain(s.default)
        if show_defaults and s.default is not MISSING and s.default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            if s.kind is bool:
                shown = "on" if default else "off"
            help_ += f" (default {shown})".replace("%", "%%")
        kw: dict[str, Any] = {
            "dest": s.key,
            "default": argparse.SUPPRESS,
            "help": help_,
            "required": s.key in required,
        }
        if s.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if s.kind is tuple:
                kw["type"] = _int_list if s.item is int else _str_list
            elif isinstance(s.kind, type) and issubclass(s.kind, enum.Enum):
                kw["type"] = str
                kw["choices"] = s.choices or [e.value for e in s.kind]
            else:
                kw["type"] = str if s.kind is Path else s.kind
            if s.choices is not None:
                kw["choices"] = list(s.choices)
            if "choices" not in kw:  # argparse would name it after the dotted key
                kw["metavar"] = s.metavar or s.flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(s.flag, **kw)


def given(args: argparse.Namespace, schema: Iterable[Setting]) -> dict[str, object]:
    """The settings given on the command line, by key, as the fields take them."""
    ns = vars(args)
    return {s.key: _coerce(s, ns[s.key]) for s in schema if s.key in ns}

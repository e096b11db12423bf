"""The subset of JSON Schema (2020-12) that ``edgeqra/schemas/*.json`` use, checked without
the ``jsonschema`` package (a test dependency only; a run directory is read without it).

Keywords: ``type``, ``const``, ``enum``, ``required``, ``properties``,
``additionalProperties``, ``propertyNames``, ``items``, ``minItems``, ``minimum``,
``maximum``, ``exclusiveMinimum``, ``pattern`` and local ``$ref`` (``#/$defs/NAME``); the
annotations (``title``, ``description``, ``$id``, ``$schema``) are ignored. Any other keyword
is refused, so a schema that outgrows this checker says so instead of checking less.
tests/test_rundir.py checks it agrees with ``jsonschema`` on real and broken summaries.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["problems"]

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}
_ANNOTATIONS = {"title", "description", "$id", "$schema", "$defs"}
_KEYWORDS = {
    "type", "const", "enum", "required", "properties", "additionalProperties",
    "propertyNames", "items", "minItems", "minimum", "maximum", "exclusiveMinimum",
    "pattern", "$ref",
}  # fmt: skip


def _is(value: Any, kind: str) -> bool:
    """JSON Schema's ``type``: booleans are not numbers, an integral float is an integer."""
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return kind == "number" or float(value).is_integer()
    return isinstance(value, _TYPES[kind])


def problems(data: Any, schema: dict[str, Any]) -> list[str]:
    """Every way ``data`` breaks ``schema``, each as ``"`dotted.path` …"`` (empty: valid)."""
    out: list[str] = []
    _check(data, schema, schema, "", out)
    return out


def _check(value: Any, node: dict[str, Any], root: dict[str, Any], at: str, out: list[str]) -> None:
    """Append the problems of ``value`` at path ``at`` against schema ``node``."""
    unknown = set(node) - _KEYWORDS - _ANNOTATIONS
    if unknown:
        raise ValueError(f"schema keyword(s) {sorted(unknown)} at `{at or '.'}` not supported")
    where = f"`{at}`" if at else "the document"
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        _check(value, root["$defs"][name], root, at, out)
    kinds = node.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            out.append(f"{where} must be {' or '.join(kinds)}, got {value!r}")
            return
    if "const" in node and value != node["const"]:
        out.append(f"{where} must be {node['const']!r}, got {value!r}")
    if "enum" in node and value not in node["enum"]:
        out.append(f"{where} must be one of {node['enum']}, got {value!r}")
    if _is(value, "number"):
        if "minimum" in node and value < node["minimum"]:
            out.append(f"{where} must be >= {node['minimum']}, got {value!r}")
        if "maximum" in node and value > node["maximum"]:
            out.append(f"{where} must be <= {node['maximum']}, got {value!r}")
        if "exclusiveMinimum" in node and value <= node["exclusiveMinimum"]:
            out.append(f"{where} must be > {node['exclusiveMinimum']}, got {value!r}")
    if isinstance(value, str) and "pattern" in node and not re.search(node["pattern"], value):
        out.append(f"{where} does not match {node['pattern']!r}: {value!r}")
    if isinstance(value, list):
        if len(value) < node.get("minItems", 0):
            out.append(f"{where} needs at least {node['minItems']} item(s), got {len(value)}")
        if "items" in node:
            for i, item in enumerate(value):
                _check(item, node["items"], root, f"{at}[{i}]", out)
    if isinstance(value, dict):
        prefix = f"{at}." if at else ""
        out.extend(f"`{prefix}{k}` is missing" for k in node.get("required", ()) if k not in value)
        properties = node.get("properties", {})
        for key, item in value.items():
            if "propertyNames" in node:
                _check(key, node["propertyNames"], root, f"{prefix}{key} (name)", out)
            if key in properties:
                _check(item, properties[key], root, f"{prefix}{key}", out)
            elif isinstance(node.get("additionalProperties"), dict):
                _check(item, node["additionalProperties"], root, f"{prefix}{key}", out)
            elif node.get("additionalProperties") is False:
                out.append(f"`{prefix}{key}` is not allowed here")

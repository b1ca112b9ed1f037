"""A small YAML writer for the manifests tlrun exports (no YAML library at run time): mappings in block
style, lists of scalars in flow style (`command: ["tlrun", "worker"]`, as the docs write them), every
string that could read as something else (a number, a boolean, null, a key) double-quoted the JSON way,
which YAML reads the same."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*$")  # never a number, a boolean, an anchor or an indicator
_KEYWORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _KEYWORDS:
        return text
    return json.dumps(text)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (Mapping, list, tuple))


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            head = f"{pad}{scalar(key)}:"
            if _is_scalar(item):
                out.append(f"{head} {scalar(item)}")
            elif not item:
                out.append(f"{head} {'{}' if isinstance(item, Mapping) else '[]'}")
            elif isinstance(item, Mapping):
                out += [head, *_lines(item, indent + 2)]
            elif all(_is_scalar(x) for x in item):
                out.append(f"{head} [{', '.join(json.dumps(x) if isinstance(x, str) else scalar(x) for x in item)}]")
            else:
                out += [head, *_lines(item, indent + 2)]
        return out
    assert isinstance(value, Sequence)
    for item in value:
        if _is_scalar(item):
            out.append(f"{pad}- {scalar(item)}")
            continue
        inner = _lines(item, indent + 2)
        out.append(f"{pad}- {inner[0].lstrip()}")
        out += inner[1:]
    return out


def document(obj: Mapping[str, Any]) -> str:
    """One mapping as a YAML document's text (ends with a newline)."""
    return "\n".join(_lines(obj, 0)) + "\n"


def stream(objs: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """Several documents, `---` between them; `header`: comment lines before the first."""
    return header + "---\n".join(document(obj) for obj in objs)

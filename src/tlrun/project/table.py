"""Replace `[tool.tlrun]` in a pyproject.toml's text, in place: every other line, comment and table of the
file stays as it was, and the new table takes the old one's position.

Text first (tomlkit rewrites the trivia around a replaced table: a comment that ends the old table's last
sub-table would be lost); the result is checked by parsing it, and tomlkit's own replacement is the
fallback when the file is written in a way the text edit does not recognise.
"""

from __future__ import annotations

import re
from typing import Any

_HEADER = re.compile(r"^[ \t]*\[\[?[ \t]*([^\]\n]+?)[ \t]*\]\]?[ \t]*(?:#.*)?$")


def _is_tlrun(name: str) -> bool:
    parts = [p.strip().strip("\"'") for p in name.split(".")]
    return parts[:2] == ["tool", "tlrun"]


def _rendered(table: Any) -> str:
    import tomlkit

    document = tomlkit.document()
    tool = tomlkit.table(is_super_table=True)
    tool.add("tlrun", table)
    document.add("tool", tool)
    return tomlkit.dumps(document).strip("\n") + "\n"


def _by_text(text: str, table: Any) -> str | None:
    lines = text.splitlines(keepends=True)
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for i, line in enumerate(lines):
        match = _HEADER.match(line)
        if match is None:
            continue
        if _is_tlrun(match.group(1)):
            if start is None:
                start = i
        elif start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(lines)))
    if not spans:
        return None
    trimmed = []
    for first, end in spans:
        # Comments and blank lines right before the next table belong to that table.
        while end > first + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        trimmed.append((first, end))
    new = _rendered(table)
    out: list[str] = []
    position = 0
    for index, (first, end) in enumerate(trimmed):
        out.extend(lines[position:first])
        if index == 0:
            if out and not out[-1].endswith("\n"):
                out[-1] += "\n"
            out.append(new)
        position = end
    out.extend(lines[position:])
    return "".join(out)


def _without_tlrun(document: Any) -> Any:
    data = dict(document)
    tool = dict(data.get("tool") or {})
    tool.pop("tlrun", None)
    if tool:
        data["tool"] = tool
    else:
        data.pop("tool", None)
    return data


def replace_table(text: str, table: Any) -> str:
    """The file's text with its tlrun table replaced by `table` (a tomlkit table)."""
    import tomlkit
    from tomlkit.exceptions import ParseError

    old = tomlkit.parse(text).unwrap()
    candidate = _by_text(text, table)
    if candidate is not None:
        try:
            new = tomlkit.parse(candidate).unwrap()
        except ParseError:
            new = None
        same_rest = new is not None and _without_tlrun(new) == _without_tlrun(old)
        if same_rest and new is not None and new.get("tool", {}).get("tlrun") == table.unwrap():
            return candidate
    document = tomlkit.parse(text)
    document["tool"]["tlrun"] = table
    return tomlkit.dumps(document)

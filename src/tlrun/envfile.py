"""Reading a project's .env: python-dotenv's syntax, `${VAR}` interpolation, and limits on what it may cost."""

from __future__ import annotations

import collections
import io
import os
from collections.abc import Mapping
from pathlib import Path

from tlrun.errors import ConfigError

MAX_DOTENV_BYTES = 1024 * 1024


def read_dotenv(path: Path) -> dict[str, str]:
    """The variables of a .env file, with python-dotenv's syntax and `${VAR}` interpolation.

    A line python-dotenv cannot parse is a ConfigError with file and line (never the line itself: it may
    hold a secret); so is a NUL byte, and a file over 1 MiB. Interpolation runs in one pass over a ChainMap
    (python-dotenv's own copies the environment for every line: 20,000 lines took 5-13 s)."""
    if not path.is_file():
        return {}
    from dotenv.parser import parse_stream

    try:
        if path.stat().st_size > MAX_DOTENV_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_DOTENV_BYTES // 1024} KiB; not a .env file tlrun reads")
        with path.open(encoding="utf-8") as stream:
            text = stream.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise ConfigError(f"{path}:{line}: NUL byte in .env")
    resolved: dict[str, str | None] = {}
    env: collections.ChainMap[str, str | None] = collections.ChainMap(resolved, os.environ)  # type: ignore[arg-type]
    for binding in parse_stream(io.StringIO(text)):
        if binding.error:
            raise ConfigError(f"{path}:{binding.original.line}: malformed line in .env (expected KEY=VALUE)")
        if binding.key is None:
            continue
        value = binding.value
        resolved[binding.key] = None if value is None else _expand(value, env, path, binding.original.line)
    return {k: v for k, v in resolved.items() if v is not None}


def _expand(value: str, env: Mapping[str, str | None], path: Path, line: int) -> str:
    """`${VAR}` interpolation with the expanded value capped at MAX_DOTENV_BYTES: nested references multiply
    (a 391-byte file expanded to 3.5 GB), so the size is checked as the parts are joined."""
    from dotenv.variables import parse_variables

    parts, size = [], 0
    for atom in parse_variables(value):
        part = atom.resolve(env)
        size += len(part)
        if size > MAX_DOTENV_BYTES:
            raise ConfigError(f"{path}:{line}: the value expands to more than {MAX_DOTENV_BYTES // 1024} KiB")
        parts.append(part)
    return "".join(parts)

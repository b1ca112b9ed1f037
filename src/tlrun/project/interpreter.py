"""tlrun outside the project's environment (pipx, `uv tool`, another venv): find the project's own
environment and hand over to the tlrun installed there, or say exactly how to install it there.

The app can only be imported, and its workers started, by the interpreter that has the project's
dependencies. Environments are found by reading, never by running a tool: `UV_PROJECT_ENVIRONMENT`, the
project's `.venv/` or `venv/` (uv's, Poetry's in-project and Pipenv's PIPENV_VENV_IN_PROJECT layout too), an
activated `VIRTUAL_ENV`, Pipenv's central environments (their `.project` file names the project) and Poetry's
(named from the project's name and a hash of its path, as Poetry names them).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlrun.errors import ConfigError

HANDED_OVER_ENV = "TLRUN_HANDED_OVER"  # set on the hand-over: the project's tlrun never hands over again


@dataclass(frozen=True)
class ProjectEnv:
    prefix: Path
    how: str  # how it was found: ".venv/", "VIRTUAL_ENV", "Poetry", "Pipenv"

    @property
    def tlrun(self) -> Path:
        return self.prefix / "bin" / "tlrun"


def _is_env(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() and (path / "bin" / "python").exists()


def _poetry_envs(root: Path, pyproject: Mapping[str, Any], environ: Mapping[str, str]) -> list[Path]:
    tool = pyproject.get("tool")
    poetry = tool.get("poetry") if isinstance(tool, dict) else None
    project = pyproject.get("project")
    name = (poetry or {}).get("name") if isinstance(poetry, dict) else None
    name = name or (project.get("name") if isinstance(project, dict) else None)
    if not isinstance(name, str) or not name:
        return []
    sanitized = re.sub(r'[ $`!*@"\\\r\n\t]', "_", name.lower())[:42]
    digest = hashlib.sha256(os.path.normcase(os.path.realpath(root)).encode()).digest()
    stem = f"{sanitized}-{base64.urlsafe_b64encode(digest).decode()[:8]}"
    home = Path(environ.get("HOME") or "~").expanduser()
    default = home / ("Library/Caches" if sys.platform == "darwin" else ".cache") / "pypoetry"
    base = Path(
        environ.get("POETRY_VIRTUALENVS_PATH") or Path(environ.get("POETRY_CACHE_DIR") or default) / "virtualenvs"
    )
    try:
        return sorted(base.glob(f"{stem}-py*"))
    except OSError:
        return []


def _pipenv_envs(root: Path, environ: Mapping[str, str]) -> list[Path]:
    home = Path(environ.get("HOME") or "~").expanduser()
    base = Path(environ.get("WORKON_HOME") or home / ".local/share/virtualenvs")
    found = []
    try:
        for path in base.glob(f"{root.name}-*"):
            try:
                if (path / ".project").read_text().strip() == str(root):
                    found.append(path)
            except OSError:
                continue
    except OSError:
        return []
    return found


def find_env(root: Path, environ: Mapping[str, str], pyproject: Mapping[str, Any] | None = None) -> ProjectEnv | None:
    """The project's own environment, when one can be found by reading."""
    candidates: list[tuple[Path, str]] = []
    uv_env = environ.get("UV_PROJECT_ENVIRONMENT")
    if uv_env:
        candidates.append((root / uv_env, "UV_PROJECT_ENVIRONMENT"))
    candidates += [(root / ".venv", ".venv/"), (root / "venv", "venv/")]
    if environ.get("VIRTUAL_ENV"):
        candidates.append((Path(environ["VIRTUAL_ENV"]), "VIRTUAL_ENV"))
    if (root / "Pipfile").is_file():
        candidates += [(p, "Pipenv") for p in _pipenv_envs(root, environ)]
    candidates += [(p, "Poetry") for p in _poetry_envs(root, pyproject or {}, environ)]
    for path, how in candidates:
        if _is_env(path):
            return ProjectEnv(path, how)
    return None


def install_command(root: Path, env: ProjectEnv, pyproject: Mapping[str, Any] | None = None) -> str:
    """The one command that installs tlrun into the project's environment, in the tool the project uses, from
    where this tlrun came (tlrun is not on the package index: a checkout or a built wheel)."""
    tool = (pyproject or {}).get("tool")
    tool = tool if isinstance(tool, dict) else {}
    source = shlex.quote(installed_from())
    if (root / "uv.lock").is_file() or "uv" in tool:
        return f"uv add --dev {source}"
    if (root / "poetry.lock").is_file() or "poetry" in tool:
        return f"poetry add --group dev {source}"
    if (root / "Pipfile").is_file():
        return f"pipenv install --dev {source}"
    if (root / "pdm.lock").is_file() or "pdm" in tool:
        return f"pdm add -dG dev {source}"
    return f"{shlex.quote(str(env.prefix / 'bin' / 'python'))} -m pip install {source}"


def installed_from() -> str:
    """Where this tlrun can be installed from again: its checkout (an editable install, or the source tree it
    runs from), else a placeholder for the wheel it came from."""
    here = Path(__file__).resolve().parents[3]  # src/tlrun/project/ -> the checkout
    if (here / "pyproject.toml").is_file() and (here / "src" / "tlrun").is_dir():
        return str(here)
    return "<path to tlrun's checkout or wheel>"


def _runnable(path: Path) -> bool:
    """A regular executable file that no other user can have replaced (not group- or world-writable, owned
    by us or root)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(info.st_mode)
        and bool(info.st_mode & stat.S_IXUSR)
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and info.st_uid in (0, os.getuid())
    )


def hand_over(
    root: Path,
    argv: Sequence[str],
    environ: Mapping[str, str] = os.environ,
    pyproject: Mapping[str, Any] | None = None,
    say: Any = None,
    required: bool = True,
) -> None:
    """Return when tlrun runs in the project's environment (or none is found); exec the project's tlrun when
    it has one; else a ConfigError with the install command, or (not `required`: a command that needs no
    project code) a return, to run here."""
    if environ.get(HANDED_OVER_ENV):
        return
    env = find_env(root, environ, pyproject)
    if env is None or os.path.realpath(env.prefix) == os.path.realpath(sys.prefix):
        return
    if _runnable(env.tlrun):
        if say is not None:
            say(f"tlrun: handing over to {env.tlrun} (the project's environment, found as {env.how})")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(str(env.tlrun), [str(env.tlrun), *argv], {**environ, HANDED_OVER_ENV: "1"})
    if not required:
        return
    raise ConfigError(
        f"tlrun runs in {sys.prefix}, but this project's environment is {env.prefix} (found as {env.how}), "
        "where tlrun is not installed: the app and its workers need the project's own interpreter",
        hint=f"install tlrun into the project: {install_command(root, env, pyproject)}; then run that tlrun",
    )

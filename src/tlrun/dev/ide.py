"""IDE run configurations that run `python -m tlrun dev` in the project root with its .env loaded.

They rely on tlrun, not on the IDE's "kill process tree" option: the IDE's Stop sends SIGINT (tlrun stops
the worker warm) and a second click SIGKILL (the parent-death signal takes the worker down).
A file the user edited is never overwritten without `force`; VS Code's launch.json is merged by entry name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from tlrun import safefile
from tlrun.errors import ConfigError

CONFIGS = (("tlrun dev", ()), ("tlrun dev (reload)", ("--reload",)), ("tlrun dev (debug)", ("--debug",)))


@dataclass(frozen=True)
class Written:
    path: Path
    action: str  # "created" | "updated" | "unchanged" | "kept (edited; --force to overwrite)" | "merged"


def _args(app: str | None, extra: tuple[str, ...]) -> list[str]:
    """`dev` and its flags; `-A` only when the app is not where tlrun reads it on every run (the project file,
    .env's CELERY_APP, discovery): a configuration then never goes stale when the app moves."""
    return ["dev", *(["-A", app] if app else []), *extra]


def pycharm_xml(name: str, app: str | None, extra: tuple[str, ...]) -> str:
    params = " ".join(_args(app, extra))
    return f"""<component name="ProjectRunConfigurationManager">
  <configuration default="false" name={quoteattr(name)} type="PythonConfigurationType" factoryName="Python">
    <option name="ENV_FILES" value="$PROJECT_DIR$/.env" />
    <option name="INTERPRETER_OPTIONS" value="" />
    <option name="PARENT_ENVS" value="true" />
    <envs>
      <env name="PYTHONUNBUFFERED" value="1" />
    </envs>
    <option name="SDK_HOME" value="" />
    <option name="WORKING_DIRECTORY" value="$PROJECT_DIR$" />
    <option name="IS_MODULE_SDK" value="true" />
    <option name="ADD_CONTENT_ROOTS" value="true" />
    <option name="ADD_SOURCE_ROOTS" value="true" />
    <option name="SCRIPT_NAME" value="tlrun" />
    <option name="PARAMETERS" value={quoteattr(params)} />
    <option name="SHOW_COMMAND_LINE" value="false" />
    <option name="EMULATE_TERMINAL" value="false" />
    <option name="MODULE_MODE" value="true" />
    <option name="REDIRECT_INPUT" value="false" />
    <option name="INPUT_FILE" value="" />
    <method v="2" />
  </configuration>
</component>
"""


def vscode_entry(name: str, app: str | None, extra: tuple[str, ...]) -> dict[str, object]:
    return {
        "name": name,
        "type": "debugpy",
        "request": "launch",
        "module": "tlrun",
        "args": _args(app, extra),
        "cwd": "${workspaceFolder}",
        "envFile": "${workspaceFolder}/.env",
        "console": "integratedTerminal",
        "justMyCode": False,
    }


def _write_if_safe(path: Path, text: str, force: bool) -> Written:
    current = _read(path)
    if current is not None:
        if current == text:
            return Written(path, "unchanged")
        if not force:
            return Written(path, "kept (edited; --force to overwrite)")
        action = "updated"
    else:
        action = "created"
    try:
        safefile.write_atomic(path, text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return Written(path, action)


def _read(path: Path) -> str | None:
    try:
        return safefile.read_text(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror} (a symlink is never followed)") from None


def write_pycharm(root: Path, app: str | None, force: bool = False) -> list[Written]:
    results = []
    for name, extra in CONFIGS:
        filename = name.replace(" ", "_").replace("(", "").replace(")", "") + ".run.xml"
        results.append(_write_if_safe(root / ".run" / filename, pycharm_xml(name, app, extra), force))
    return results


def _load_launch_json(path: Path, text: str, force: bool) -> tuple[dict[str, object], str]:
    """(document, how) for an existing launch.json: plain JSON; JSON with comments or trailing commas (VS
    Code's own JSONC, read with json5), merged only with --force because rewriting it drops the comments;
    anything else replaced only with --force."""
    try:
        return _checked(json.loads(text)), "merged"
    except ValueError:
        pass
    import json5

    try:
        document = _checked(json5.loads(text))
    except ValueError as exc:
        if not force:
            raise ConfigError(
                f"{path} is not JSON ({exc}); tlrun will not rewrite it",
                hint="fix it, add the three entries by hand (docs/commands.md), or use --force to replace it",
            ) from None
        return {"version": "0.2.0", "configurations": []}, "replaced (it was not JSON)"
    if not force:
        raise ConfigError(
            f"{path} has comments, which rewriting it would drop; tlrun will not rewrite it",
            hint="add the three entries by hand, or use --force to merge them (your entries stay, comments go)",
        )
    return document, "merged (its comments were dropped)"


def _checked(loaded: object) -> dict[str, object]:
    if not isinstance(loaded, dict) or not isinstance(loaded.get("configurations", []), list):
        raise ValueError("no configurations list")
    return loaded


def write_vscode(root: Path, app: str | None, force: bool = False) -> list[Written]:
    path = root / ".vscode" / "launch.json"
    text = _read(path)
    document: dict[str, object] = {"version": "0.2.0", "configurations": []}
    how = "merged"
    if text is not None:
        document, how = _load_launch_json(path, text, force)
    configurations: list[dict[str, object]] = list(document.get("configurations", []))  # type: ignore[call-overload]
    changed, kept = how != "merged", False
    for name, extra in CONFIGS:
        entry = vscode_entry(name, app, extra)
        existing = next(
            (i for i, c in enumerate(configurations) if isinstance(c, dict) and c.get("name") == name), None
        )
        if existing is None:
            configurations.append(entry)
            changed = True
        elif configurations[existing] != entry:
            if force:
                configurations[existing] = entry
                changed = True
            else:
                kept = True
    document["configurations"] = configurations
    if not changed:
        return [Written(path, "kept (edited; --force to overwrite)" if kept else "unchanged")]
    result = _write_if_safe(path, json.dumps(document, indent=2) + "\n", force=True)
    return [Written(path, how if result.action == "updated" else result.action)]

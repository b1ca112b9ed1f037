"""Every bad input tlrun is tested with: the table `test_bad_input.py` runs and `docs/reliability.md` shows.

python tests/bad_inputs.py   # print the Markdown table (docs/reliability.md, section "Bad input")
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # after `tlrun`; {app} is the project's app, {free} a free port
    code: int
    says: str  # a fragment of what tlrun prints on stderr
    files: dict[str, str] = field(default_factory=dict)  # written into the project first
    env: dict[str, str] = field(default_factory=dict)


W = ("worker", "-A", "{app}")
# 64 bytes, then each line four times the one before: line 9 would be 4 MiB (a 400-byte file, 3.5 GB unchecked)
NESTED = "A0=" + "x" * 64 + "\n" + "".join(f"A{i}=" + f"${{A{i - 1}}}" * 4 + "\n" for i in range(1, 9))
CASES = [
    Case(
        "unknown app module (or the wrong directory)",
        ("worker", "-A", "no_such_module_xyz"),
        4,
        "no module named 'no_such_module_xyz' in",
    ),
    Case("app with a syntax error", ("worker", "-A", "synerr"), 4, "SyntaxError", {"synerr.py": "def broken(:\n"}),
    Case(
        "app raising at import (Celery's traceback only with -v)",
        ("worker", "-A", "raiser"),
        4,
        "boom at import",
        {"raiser.py": "raise RuntimeError('boom at import')\n"},
    ),
    Case("wrong broker scheme", (*W, "-b", "rediss-typo://127.0.0.1:1/0"), 5, "unsupported scheme"),
    Case("unreachable broker (nothing listens)", (*W, "-b", "redis://127.0.0.1:{free}/0"), 5, "refused the connection"),
    Case("an in-process broker (memory://)", (*W, "-b", "memory://"), 5, "lives inside one process"),
    Case("malformed broker URL", (*W, "-b", "redis://[::1"), 2, "cannot be parsed"),
    Case("empty -b", (*W, "-b", ""), 2, "-b/--broker is empty"),
    Case("port 0 (kombu would pick its default port)", (*W, "-b", "redis://127.0.0.1:0/0"), 2, "has port 0"),
    Case(
        "an unknown URL query parameter",
        (*W, "-b", "redis://127.0.0.1:{free}/0?foo=1"),
        3,
        "a query parameter the Redis client does not know: foo",
    ),
    Case(
        "unencoded '#' in a password",
        (*W, "-b", "redis://:pa#ss@127.0.0.1:1/0"),
        2,
        "must be percent-encoded",
    ),
    Case("malformed .env", W, 3, ".env:2: malformed line", {".env": "A=1\nthis line is wrong\n"}),
    Case("NUL byte in .env", W, 3, ".env:2: NUL byte", {".env": "A=1\nB=\0\n"}),
    Case(".env over 1 MiB", W, 3, "larger than 1024 KiB", {".env": "A=" + "x" * (1024 * 1024) + "\n"}),
    Case(".env whose nested ${VAR}s expand past 1 MiB", W, 3, ".env:9: the value expands", {".env": NESTED}),
    Case("unknown option", (*W, "--bogus"), 2, "No such option '--bogus'"),
    Case("unknown Celery option after --", (*W, "--", "--bogus"), 2, "celery worker refused its arguments"),
    Case("zero concurrency", (*W, "--concurrency", "0"), 2, "--concurrency"),
    Case("negative concurrency", (*W, "--concurrency", "-3"), 2, "--concurrency"),
    Case("huge concurrency", (*W, "-c", "99999999999999999999"), 2, "--concurrency"),
    Case("NaN grace period", (*W, "--grace", "nan"), 2, "'nan' is not a finite number"),
    Case("infinite ping window", (*W, "--ping-window", "inf"), 2, "inf is not in the range 0.1<=x<=604800"),
    Case("a ping window of 300 years", (*W, "--ping-window", "1e10"), 2, "--ping-window"),
    Case("a grace period of 1e308 s", (*W, "--grace", "1e308"), 2, "--grace"),
    Case(
        "a grace of years in .env", W, 3, "TLRUN_STOP_GRACE='1e9': must be at most", {".env": "TLRUN_STOP_GRACE=1e9\n"}
    ),
    Case("NaN grace for sweep", ("sweep", "-A", "{app}", "--grace", "nan"), 2, "'nan' is not a finite number"),
    Case(
        "NaN in the environment",
        W,
        3,
        "TLRUN_STOP_GRACE='nan': expected a finite number",
        env={"TLRUN_STOP_GRACE": "nan"},
    ),
    Case("NaN in .env", W, 3, "TLRUN_PING_WINDOW='NaN': expected a finite number", {".env": "TLRUN_PING_WINDOW=NaN\n"}),
    Case(
        "word in the environment",
        W,
        3,
        "TLRUN_READY_TIMEOUT='soon': expected a number",
        env={"TLRUN_READY_TIMEOUT": "soon"},
    ),
    Case("word for an integer", W, 3, "TLRUN_CONCURRENCY='abc': expected an integer", env={"TLRUN_CONCURRENCY": "abc"}),
    Case("extremely long node prefix", (*W, "--node-prefix", "x" * 5000), 3, "node prefix"),
    Case("node prefix with an @", (*W, "--node-prefix", "a@b"), 3, "node prefix"),
    Case(
        "log directory under a file",
        (*W, "--log-dir", "not-a-dir/logs"),
        12,
        "cannot write the worker log",
        {"not-a-dir": "a file"},
    ),
    Case(
        "--textfile in a missing directory",
        ("doctor", "-A", "{app}", "--textfile", "/missing/x.prom"),
        2,
        "does not exist",
    ),
    Case(
        "a newline in the app name of a unit",
        ("export", "systemd", "-A", "a\nExecStartPre=/bin/touch /tmp/pwned"),
        3,
        "is not a dotted module path",
    ),
    Case("a project file that is not TOML", W, 3, "TOML syntax error", {"pyproject.toml": "[tool.tlrun\n"}),
    Case("an unknown project-file key", W, 3, "unknown key", {"pyproject.toml": "[tool.tlrun]\nap = 'x'\n"}),
    Case(
        "a project file nested 5,000 deep",
        W,
        3,
        "nested too deeply",
        {"pyproject.toml": "x = " + "[" * 5000 + "]" * 5000 + "\n"},
    ),
    Case(
        "an unwritable HOME and no runtime directory",
        ("dev", "-A", "{app}"),
        11,
        "cannot create tlrun's state directory",
        env={"HOME": "/proc/tlrun-no-home", "XDG_RUNTIME_DIR": "", "XDG_CACHE_HOME": ""},
    ),
    Case("a role that does not exist", (*W, "--role", "nope"), 3, "no role named 'nope'"),
    # Passthrough that would defeat the guarantees: refused before anything is swept or started.
    Case("--detach after -- (an unsupervised worker)", (*W, "--", "--detach"), 2, "--detach is tlrun's to set"),
    Case("a node name after --", (*W, "--", "-n", "other@%h"), 2, "-n is tlrun's to set"),
    Case("--hostname= after --", (*W, "--", "--hostname=x@y"), 2, "--hostname is tlrun's to set"),
    Case("a pidfile after --", (*W, "--", "--pidfile=/tmp/w.pid"), 2, "--pidfile is tlrun's to set"),
    Case("a log file after --", (*W, "--", "-f", "/tmp/w.log"), 2, "-f is tlrun's to set"),
    Case("an embedded beat after --", (*W, "--", "-B"), 2, "-B is tlrun's to set"),
    Case(
        "-Q after -- in a project with roles",
        (*W, "--", "-Q", "xq"),
        2,
        "-Q is tlrun's to set",
        {"pyproject.toml": '[tool.tlrun.workers.a]\nqueues = ["a"]\n[tool.tlrun.workers.b]\nqueues = ["b"]\n'},
    ),
    Case(
        "-X after -- excluding every queue of a role",
        (*W, "--", "-X", "qa"),
        2,
        "role a: -X/--exclude-queues qa excludes every queue it consumes",
        {"pyproject.toml": '[tool.tlrun.workers.a]\nqueues = ["qa"]\n[tool.tlrun.workers.b]\nqueues = ["b", "qa"]\n'},
    ),
    Case(
        "-X in a role's extra_args excluding its own queues",
        W,
        3,
        "role a: -X/--exclude-queues a,b excludes every queue it consumes",
        {"pyproject.toml": '[tool.tlrun.workers.a]\nqueues = ["a", "b"]\nextra_args = ["--exclude-queues=a,b"]\n'},
    ),
    Case(
        "--detach in a role's extra_args",
        W,
        3,
        "extra_args of role a: --detach is tlrun's to set",
        {"pyproject.toml": '[tool.tlrun.workers.a]\nqueues = ["a"]\nextra_args = ["--detach"]\n'},
    ),
    Case("a queue list with no names", (*W, "-Q", ","), 3, "no queue name"),
    Case("a line break in --log-dir", (*W, "--log-dir", "logs\nx"), 3, "has a line break"),
    Case(
        "a process whose command uses {port} without a port",
        ("dev", "-A", "{app}"),
        3,
        "uses {port} but the process has no `port`",
        {"pyproject.toml": '[tool.tlrun.processes.web]\ncommand = "serve {port}"\n'},
    ),
    Case(
        "a process whose program is not installed",
        ("dev", "-A", "{app}", "--no-broker"),
        3,
        "'no-such-program-x1' is not on PATH",
        {"pyproject.toml": '[tool.tlrun.processes.web]\ncommand = "no-such-program-x1 --serve"\n'},
    ),
    Case(
        "two processes on one fixed port",
        ("dev", "-A", "{app}"),
        3,
        "port 8431 is also the port of process 'web'",
        {
            "pyproject.toml": '[tool.tlrun.processes.web]\ncommand = "sh -c true"\nport = 8431\n'
            '[tool.tlrun.processes.api]\ncommand = "sh -c true"\nport = 8431\n'
        },
    ),
    Case(
        "a process named like a role",
        ("dev", "-A", "{app}"),
        3,
        "names a role and a process",
        {"pyproject.toml": '[tool.tlrun.workers.web]\nqueues = ["a"]\n[tool.tlrun.processes.web]\ncommand = "x"\n'},
    ),
    Case(
        "a Procfile line without `name:`",
        ("dev", "-A", "{app}"),
        3,
        "expected `name: command`",
        {"Procfile": "web: ok\njust a command\n"},
    ),
    Case(
        "a NUL byte in a Procfile",
        ("dev", "-A", "{app}"),
        3,
        "line 2: holds a NUL byte",
        {"Procfile": "web: ok\nworker: python -m http.server\x00 8000\n"},
    ),
    Case(
        "a process folder that does not exist",
        ("dev", "-A", "{app}", "--no-broker"),
        3,
        "does not exist",
        {"pyproject.toml": '[tool.tlrun.processes.web]\ncommand = "sh -c true"\ncwd = "frontend"\n'},
    ),
    Case("an unknown unit for --only", ("dev", "-A", "{app}", "--only", "nope"), 2, "no unit named 'nope'"),
    Case("an unknown unit to restart", ("restart", "-A", "{app}", "nope"), 2, "no unit named 'nope'"),
    Case(
        "restart of a process when nothing runs",
        ("restart", "-A", "{app}", "web"),
        19,
        "no launcher of this project runs web here",
        {"pyproject.toml": '[tool.tlrun.processes.web]\ncommand = "x"\n'},
    ),
    Case(
        "stop of a process when nothing runs",
        ("stop", "-A", "{app}", "web"),
        19,
        "web does not run here",
        {"pyproject.toml": '[tool.tlrun.processes.web]\ncommand = "x"\n'},
    ),
]


def shown(case: Case) -> str:
    args = " ".join(a if len(a) < 40 else a[:12] + "..." for a in case.args).replace("\n", "\\n")
    return f"tlrun {args}".replace("{app}", "APP").replace("{free}", "PORT").replace("|", "\\|")


def table() -> str:
    lines = ["| input | command | exit code | tlrun says (fragment) |", "|---|---|---|---|"]
    for case in CASES:
        says = case.says.replace("|", "\\|")
        lines.append(f"| {case.name} | `{shown(case)}` | {case.code} | `{says}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")

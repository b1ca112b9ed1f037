"""Pure logic: settings precedence, .env parsing, argv parsing and building, node names, redaction."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlrun.config import Settings, build_settings, project_id, read_dotenv, validate_prefix
from tlrun.errors import ConfigError
from tlrun.launch import procs, spawn
from tlrun.launch.procs import CeleryProcess, expand_node_name, parse_celery_argv, project_match
from tlrun.launch.verify import ReadyNode, build_report
from tlrun.redact import Redactor, redact_url, secrets_of

ROOT = Path("/srv/proj")


def settings_from(
    cli: dict[str, object] | None = None, env: dict[str, str] | None = None, dotenv: dict[str, str] | None = None
) -> Settings:
    return build_settings(cli or {}, env or {}, dotenv or {}, ROOT)


# -- precedence -------------------------------------------------------------------------------------
def test_precedence_cli_over_env_over_dotenv_over_default() -> None:
    dotenv = {"CELERY_APP": "from_dotenv", "TLRUN_NODE_PREFIX": "dot", "TLRUN_STOP_GRACE": "7"}
    env = {"CELERY_APP": "from_env", "TLRUN_NODE_PREFIX": "envp"}
    s = settings_from({"app": "from_cli"}, env, dotenv)
    assert s.app == "from_cli"
    assert s.role.node_prefix == "envp" and s.role.name == "default" and not s.role.declared
    assert s.stop_grace == 7.0
    assert s.ready_timeout == 30.0  # default
    assert settings_from({}, env, dotenv).app == "from_env"
    assert settings_from({}, {}, dotenv).app == "from_dotenv"


def test_broker_falls_back_to_redis_url() -> None:
    assert settings_from({"app": "a"}, {"REDIS_URL": "redis://r"}).broker_url == "redis://r"
    both = {"REDIS_URL": "redis://r", "CELERY_BROKER_URL": "amqp://b"}
    assert settings_from({"app": "a"}, both).broker_url == "amqp://b"
    assert settings_from({"app": "a", "broker": "redis://cli"}, both).broker_url == "redis://cli"
    # .env's CELERY_BROKER_URL loses to the process environment's REDIS_URL? No: each key resolves on the
    # merged environment, where the process environment wins key by key.
    assert (
        settings_from({"app": "a"}, {"REDIS_URL": "redis://env"}, {"CELERY_BROKER_URL": "redis://dot"}).broker_url
        == "redis://dot"
    )


def test_worker_environment_keeps_process_values_over_dotenv() -> None:
    s = settings_from({"app": "a"}, {"X": "env"}, {"X": "dot", "Y": "dot"})
    assert s.environ["X"] == "env" and s.environ["Y"] == "dot"


def test_missing_app_and_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="no Celery app"):
        settings_from()
    with pytest.raises(ConfigError, match="TLRUN_EXPECTED_WORKERS='zero': expected an integer"):
        settings_from({"app": "a"}, {"TLRUN_EXPECTED_WORKERS": "zero"})
    with pytest.raises(ConfigError, match="TLRUN_CONCURRENCY='0': must be at least 1"):
        settings_from({"app": "a"}, {"TLRUN_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match="TLRUN_POOL"):
        settings_from({"app": "a"}, {"TLRUN_POOL": "fork"})


def test_log_dir_is_relative_to_project_root() -> None:
    assert settings_from({"app": "a"}).log_dir == ROOT / "logs"
    assert settings_from({"app": "a", "log_dir": "/var/log/x"}).log_dir == Path("/var/log/x")


# -- .env ---------------------------------------------------------------------------------------------
def test_dotenv_values_and_malformed_line(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("# comment\nCELERY_APP=proj.celery\nexport REDIS_URL='redis://x:1/0'\n")
    assert read_dotenv(env) == {"CELERY_APP": "proj.celery", "REDIS_URL": "redis://x:1/0"}
    env.write_text("A=1\nB=2\nthis is not an assignment secretvalue\nC=3\n")
    with pytest.raises(ConfigError) as info:
        read_dotenv(env)
    assert f"{env}:3: malformed line" in str(info.value)
    assert "secretvalue" not in str(info.value)
    assert read_dotenv(tmp_path / "missing.env") == {}


_keys = st.text(alphabet=string.ascii_uppercase + "_", min_size=1, max_size=12).filter(lambda k: k[0] != "_")
_values = st.text(alphabet=string.ascii_letters + string.digits + "/:@._-", max_size=30)


@given(st.dictionaries(_keys, _values, max_size=8))
@settings(max_examples=60, deadline=None)
def test_dotenv_round_trip(tmp_path_factory: pytest.TempPathFactory, values: dict[str, str]) -> None:
    path = tmp_path_factory.mktemp("env") / ".env"
    path.write_text("".join(f'{k}="{v}"\n' for k, v in values.items()))
    assert read_dotenv(path) == values


# -- node names ----------------------------------------------------------------------------------------
def test_node_names() -> None:
    assert spawn.node_name("api", 4242, "host") == "api4242@host"
    assert spawn.unique_node_name("api", 1, "h", {"api1@h", "api1-1@h"}) == "api1-2@h"
    assert expand_node_name(None, "box.example.com") == "celery@box.example.com"
    assert expand_node_name("w1@%h", "box.example.com") == "w1@box.example.com"
    assert expand_node_name("w@%n.%d", "box.example.com") == "w@box.example.com"
    assert expand_node_name("w1", "box") == "w1@box"


@given(st.text(min_size=1, max_size=80))
def test_prefix_validation_accepts_only_safe_names(prefix: str) -> None:
    try:
        validate_prefix(prefix)
    except ConfigError as exc:
        assert len(str(exc)) < 300  # an extremely long prefix is cut in the message
    else:
        assert len(prefix) <= 40 and set(prefix) <= set(string.ascii_letters + string.digits + "_.-")
        assert "@" not in spawn.node_name(prefix, 1, "h")[:-2]


# -- argv ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/v/bin/python", "-m", "celery", "-A", "proj", "worker", "-n", "w1@h"], ("proj", "worker", "w1@h")),
        (["/v/bin/celery", "--app=proj.celery", "worker", "--hostname=x@%h"], ("proj.celery", "worker", "x@%h")),
        (["python3", "/v/bin/celery", "-Aproj", "beat"], ("proj", "beat", None)),
        (["python", "-u", "-X", "dev", "-m", "celery", "-b", "redis://", "-A", "p", "worker"], ("p", "worker", None)),
        (["python", "-mcelery", "-A", "p", "worker", "-nw@h"], ("p", "worker", "w@h")),
        (["sh", "-c", "sleep 300", "celery", "worker", "-A", "p"], None),
        (["sleep", "300", "celery", "worker"], None),
        (["python", "-c", "import time", "-m", "celery", "-A", "p", "worker"], None),
        (["python", "-m", "tlrun", "worker", "-A", "p"], None),
        (["celery", "-A", "p"], None),
        ([], None),
    ],
)
def test_parse_celery_argv(argv: list[str], expected: tuple[str, str, str | None] | None) -> None:
    cmd = parse_celery_argv(argv)
    if expected is None:
        assert cmd is None
    else:
        assert cmd is not None and (cmd.app, cmd.subcommand, cmd.node) == expected


@given(st.lists(st.text(alphabet=string.printable, max_size=20), max_size=12))
def test_parse_celery_argv_never_raises(argv: list[str]) -> None:
    parse_celery_argv(argv)


@given(st.lists(st.text(alphabet=string.ascii_letters + string.digits + "-=_.@%", min_size=1, max_size=15), max_size=6))
def test_extra_args_pass_through_verbatim_and_last(extra: list[str]) -> None:
    from tlrun.errors import UsageError
    from tlrun.passthrough import OWNED_OPTIONS, _owned

    if any(_owned(arg, names) for arg in extra for names in OWNED_OPTIONS):  # tlrun's own: refused, never passed
        with pytest.raises(UsageError, match="is tlrun's to set"):
            build_settings({"app": "proj", "extra": tuple(extra), "concurrency": 2}, {}, {}, ROOT)
        return
    s = build_settings({"app": "proj", "extra": tuple(extra), "concurrency": 2}, {}, {}, ROOT)
    argv = spawn.worker_argv(s.app, s.role.worker, "api1@h", python="/v/bin/python3.11")
    assert argv[:8] == ["/v/bin/python3.11", "-m", "celery", "-A", "proj", "worker", "-n", "api1@h"]
    assert argv[len(argv) - len(extra) :] == extra
    assert "--concurrency" in argv and argv[argv.index("--concurrency") + 1] == "2"
    cmd = parse_celery_argv(argv)
    assert cmd is not None and cmd.app == "proj" and cmd.subcommand == "worker"


def test_worker_env_has_markers_and_broker_never_in_argv() -> None:
    s = settings_from({"app": "proj", "broker": "redis://:pw@h/0"})
    env = spawn.worker_env(s, "api1@h", procs.Identity(10, 123.0), s.broker_url, "default")
    assert env["CELERY_BROKER_URL"] == "redis://:pw@h/0"
    assert env["TLRUN_PROJECT"] == s.project_id and env["TLRUN_NODE"] == "api1@h"
    assert env["TL_CELERY_STARTED"] == "10:123.00" and env["TLRUN_ROLE"] == "default"
    assert not any("pw" in a for a in spawn.worker_argv(s.app, s.role.worker, "api1@h"))


# -- project matching ----------------------------------------------------------------------------------
def _proc(**kw: object) -> CeleryProcess:
    base: dict[str, object] = dict(
        pid=100,
        ppid=1,
        create_time=1.0,
        uid=os.getuid(),
        role="worker",
        app="proj",
        node="w@h",
        cwd=str(ROOT),
        marker=None,
        launcher=None,
    )
    base.update(kw)
    return CeleryProcess(**base)  # type: ignore[arg-type]


def test_a_node_names_local_pids_are_this_apps_when_any_are() -> None:
    """Two projects on one host both answer as Celery's default `celery@host`, each on its own broker."""
    ours = _proc(pid=10, node="celery@h", app="proj")
    theirs = _proc(pid=20, node="celery@h", app="shop")
    unknown = _proc(pid=30, node="w@h", app=None)
    assert procs.pids_by_node([ours, theirs, unknown], "proj") == {"celery@h": [10], "w@h": [30]}
    # No process of that name runs this app (named otherwise on its command line): all of them.
    assert procs.pids_by_node([theirs], "proj") == {"celery@h": [20]}
    assert procs.pids_by_node([_proc(node=None)], "proj") == {}


def test_project_match() -> None:
    pid = project_id(ROOT, "proj")
    uid = os.getuid()
    assert project_match(_proc(), pid, "proj", ROOT, uid)  # by app and directory
    assert not project_match(_proc(app="other"), pid, "proj", ROOT, uid)
    assert not project_match(_proc(cwd="/srv/other"), pid, "proj", ROOT, uid)
    assert not project_match(_proc(uid=uid + 1), pid, "proj", ROOT, uid)
    assert project_match(_proc(marker=pid, cwd="/anywhere"), pid, "proj", ROOT, uid)  # by marker
    # A marker wins over the directory: another project's worker started from here is not ours.
    assert not project_match(_proc(marker="0" * 16), pid, "proj", ROOT, uid)
    assert project_id(ROOT, "proj") != project_id(ROOT, "proj2") != project_id(Path("/srv/x"), "proj")


def test_main_processes_excludes_pool_children() -> None:
    rows = [_proc(pid=10, ppid=1), _proc(pid=11, ppid=10), _proc(pid=12, ppid=10), _proc(pid=20, ppid=99)]
    assert [p.pid for p in procs.main_processes(rows)] == [10, 20]


# -- verification report -------------------------------------------------------------------------------
def test_report_counts_raw_replies() -> None:
    ours = [ReadyNode("default", "api1@h", 2)]
    report = build_report(ours, 1.5, ["x@h", "x@h", "y@other"], 1, {"x@h": [7, 8]})
    assert report.nodes[0].replies == 1 and report.answering == 4 and not report.as_expected
    x = report.others[0]
    assert (x.name, x.replies, x.local_pids, x.duplicated) == ("x@h", 2, (7, 8), True)
    assert build_report(ours, 1.0, [], 1, {}).as_expected
    assert build_report(ours, 1.0, ["api1@h"], 1, {}).duplicated[0].replies == 2
    two = [ReadyNode("default", "default1@h", 2), ReadyNode("reports", "reports1@h", 3)]
    both = build_report(two, 1.0, ["other@h"], 2, {})
    assert both.answering == 3 and not both.as_expected and [n.node for n in both.nodes] == ["default1@h", "reports1@h"]


# -- redaction -----------------------------------------------------------------------------------------
def test_redaction() -> None:
    assert redact_url("redis://:secret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("amqp://user:secret@h//") == "amqp://user:***@h//"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert Redactor(["secret", None])("url redis://:secret@h and secret again") == "url redis://:***@h and *** again"


@given(st.text(alphabet=string.ascii_letters + string.digits + "!$&'()*+,;=-._~", min_size=1, max_size=30))
def test_redacted_url_never_contains_password(password: str) -> None:
    from urllib.parse import urlsplit

    redacted = urlsplit(redact_url(f"redis://user:{password}@host:6379/0"))
    assert (redacted.username, redacted.password, redacted.hostname, redacted.port) == ("user", "***", "host", 6379)


# -- restart policy ------------------------------------------------------------------------------------
def test_restart_backoff_grows_is_capped_and_gives_up() -> None:
    from tlrun.deploy.restart import RestartPolicy, RestartSettings

    now = [0.0]
    policy = RestartPolicy(
        RestartSettings(first_delay=1, max_delay=5, give_up_crashes=5, give_up_window=100, jitter=0.25),
        clock=lambda: now[0],
        rand=lambda: 1.0,
    )
    delays = []
    for _ in range(4):
        now[0] += 1
        delays.append(policy.on_crash())
    assert delays == [1.25, 2.5, 5.0, 6.25]  # doubled, capped at 5, jitter 25 % on top
    now[0] += 1
    assert policy.on_crash() is None and "5 crashes within 100 s" in policy.why_given_up()


def test_restart_window_forgets_old_crashes_and_max_restarts() -> None:
    from tlrun.deploy.restart import RestartPolicy, RestartSettings

    now = [0.0]
    policy = RestartPolicy(
        RestartSettings(first_delay=1, give_up_crashes=2, give_up_window=10, jitter=0), clock=lambda: now[0]
    )
    for _ in range(5):
        now[0] += 20  # crashes far apart never add up to the give-up rule
        assert policy.on_crash() == 1
    capped = RestartPolicy(RestartSettings(max_restarts=2, give_up_crashes=99, jitter=0), clock=lambda: now[0])
    assert capped.on_crash() is not None and capped.on_crash() is not None
    assert capped.on_crash() is None and "--max-restarts" in capped.why_given_up()


@given(st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=30), st.floats(0, 1))
def test_restart_delay_is_bounded(gaps: list[float], jitter_draw: float) -> None:
    from tlrun.deploy.restart import RestartPolicy, RestartSettings

    now = [0.0]
    s = RestartSettings(first_delay=0.5, max_delay=30, give_up_crashes=1000, give_up_window=60)
    policy = RestartPolicy(s, clock=lambda: now[0], rand=lambda: jitter_draw)
    for gap in gaps:
        now[0] += gap
        delay = policy.on_crash()
        assert delay is not None and s.first_delay <= delay <= s.max_delay * (1 + s.jitter)


def test_census_imports_celery_on_the_calling_thread() -> None:
    # Regression: a census thread importing Celery while the main thread imported the user's app failed
    # with "cannot import name 'Celery'" (Celery's package replaces itself during import).
    import subprocess
    import sys

    code = (
        "import sys; from tlrun.launch.verify import Census; assert 'celery' not in sys.modules; "
        "Census('redis://127.0.0.1:1/0', 0.1); assert 'celery' in sys.modules; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


# -- redaction of every URL form -----------------------------------------------------------------------
URL_FORMS = [
    # (url, secrets that must never be printed)
    ("redis://:s3cr#t/pw?x@127.0.0.1:6379/0", ["s3cr#t/pw?x"]),  # unencoded '#', '/', '?'
    ("redis://127.0.0.1:6379/0?password=qu3rysecret", ["qu3rysecret"]),
    ("redis://127.0.0.1:6379/0?db=1&password=qu3ry2&x=y", ["qu3ry2"]),
    ("redis://us3rsecret@127.0.0.1:6379/0", ["us3rsecret"]),  # the password where the user goes
    ("redis://user:p%40ss%2Fword@h/0", ["p%40ss%2Fword", "p@ss/word"]),  # as written and as decoded
    ("redis://user:a@b@c@h:6379/0", ["a@b@c"]),  # '@' inside the password
    ("amqp://guest:gu3stpw@localhost:5672//", ["gu3stpw"]),
    ("rediss://:tl5pw@h:6380/0?ssl_cert_reqs=required", ["tl5pw"]),
    ("sentinel://:s3ntinel@h:26379;sentinel://:s3ntinel@h2:26379", ["s3ntinel"]),
]


@pytest.mark.parametrize(("url", "secrets"), URL_FORMS)
def test_every_url_form_is_masked(url: str, secrets: list[str]) -> None:
    shown = redact_url(url)
    found = secrets_of(url)
    for secret in secrets:
        assert secret not in shown, shown
        assert secret in found
        assert secret not in Redactor(found)(f"error: could not connect to {url} with {secret}")


def test_urls_without_secrets_are_shown_as_they_are() -> None:
    for url in ("redis://127.0.0.1:6379/0", "amqp://localhost//", "redis://h/0?db=2"):
        assert redact_url(url) == url and secrets_of(url) == []


def test_masking_stream_masks_registered_secrets() -> None:
    import io

    from tlrun import redact

    redact.register("redis://:r3gistered@h/0")
    out = io.StringIO()
    redact.MaskingStream(out).write("tlrun: error: refused r3gistered\n")  # type: ignore[arg-type]
    assert out.getvalue() == "tlrun: error: refused ***\n"


def test_old_log_files_are_pruned_by_kind(tmp_path: Path) -> None:
    import time as _time

    from tlrun.launch.logfiles import prune

    for pid in range(100, 115):
        (tmp_path / f"redis_{pid}.log").write_text("x")
        os.utime(tmp_path / f"redis_{pid}.log", (_time.time() + pid, _time.time() + pid))
    (tmp_path / "redis_100.log.1").write_text("rotated")
    (tmp_path / "celery_worker_1.log").write_text("another kind")
    (tmp_path / "redis_notes.txt").write_text("not ours")
    removed = prune(tmp_path, "redis_999", keep=4)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "celery_worker_1.log",
        "redis_111.log",
        "redis_112.log",
        "redis_113.log",
        "redis_114.log",
        "redis_notes.txt",
    ]
    assert tmp_path / "redis_100.log.1" in removed


# -- the fix to Celery's pool flush (launch/_celery_fix.py) ---------------------------------------------
class _Proc:
    def __init__(self, alive: bool) -> None:
        self.alive = alive

    def _is_alive(self) -> bool:
        return self.alive


class _Job:
    def __init__(self, job: int, accepted: bool, write_to: _Proc | None) -> None:
        self._job, self._accepted, self._write_to = job, accepted, write_to


class _Pool:
    """Celery's AsynPool.flush in small: every job no child has acknowledged leaves the cache."""

    def __init__(self, jobs: list[_Job], synack: bool = False) -> None:
        self._cache = {j._job: j for j in jobs}
        self.synack = synack

    def flush(self) -> None:
        for job in tuple(self._cache.values()):
            if not job._accepted:
                self._cache.pop(job._job)


def test_jobs_written_to_a_live_child_stay_in_the_pool_cache() -> None:
    from tlrun.launch import _celery_fix

    live, dead = _Proc(True), _Proc(False)
    jobs = [_Job(1, True, live), _Job(2, False, live), _Job(3, False, None), _Job(4, False, dead)]
    pool = _Pool(jobs)
    _celery_fix.keep_written_jobs(_Pool.flush)(pool)
    # Running (1) and written to a live child (2) stay; never written (3) and its child dead (4) go.
    assert sorted(pool._cache) == [1, 2]
    synack = _Pool(jobs, synack=True)  # with synack, Celery nacks unaccepted jobs itself: nothing kept
    _celery_fix.keep_written_jobs(_Pool.flush)(synack)
    assert sorted(synack._cache) == [1]


def test_the_celery_fix_applies_to_this_celery_once_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.concurrency.asynpool import AsynPool

    from tlrun.launch import _celery_fix

    original = AsynPool.flush
    monkeypatch.setattr(AsynPool, "flush", original)
    assert _celery_fix.install({"TLRUN_CELERY_FIX": "0"}) is False and AsynPool.flush is original
    assert _celery_fix.install({}) is True
    patched = AsynPool.flush
    assert patched is not original and patched.__wrapped__ is original  # type: ignore[attr-defined]
    assert _celery_fix.install({}) is True and AsynPool.flush is patched  # never wrapped twice


def test_the_launchers_own_identity_is_psutils_without_psutil() -> None:
    """The early start reads its create time from /proc (identity.py); every other reader uses psutil:
    the two must agree to the bit, or a live launcher would pass for dead."""
    import psutil

    from tlrun.launch.identity import Identity

    mine = Identity.of_self()
    assert mine == Identity(os.getpid(), psutil.Process().create_time())
    assert mine.is_alive() and Identity.decode(mine.encode()) is not None


def test_the_lazy_command_group_knows_every_command_and_its_module() -> None:
    """Commands are imported only when they run (cli/base.py): the map must name each one's module."""
    import importlib

    from tlrun.cli import base

    for module in set(base.COMMAND_MODULES.values()):
        importlib.import_module(module)
    assert set(base.cli.commands) == set(base.COMMAND_MODULES)
    for name, command in base.cli.commands.items():
        assert command.callback is not None and command.callback.__module__ == base.COMMAND_MODULES[name]

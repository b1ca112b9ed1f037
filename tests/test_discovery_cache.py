"""The discovery cache: a second command reuses the answer, and notices an edit, a new file, a deleted file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tlrun.errors import ConfigError
from tlrun.project import discover
from tlrun.project.discover import discover_cached


def _age(root: Path) -> None:
    """Every file and folder written long ago (a fresh mtime is never trusted by the cache)."""
    old = time.time() - 100
    for path in [root, *root.rglob("*")]:
        os.utime(path, (old, old), follow_symlinks=False)


def _project(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "celery.py").write_text("from celery import Celery\n\napp = Celery('x', broker='redis://')\n")
    (root / "pkg" / "tasks.py").write_text("from pkg.celery import app\n")
    _age(root)


def _cached_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("scanned again: the cache was not used")

    monkeypatch.setattr(discover, "discover_app", refuse)


def test_a_second_discovery_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, runtime = tmp_path / "proj", tmp_path / "run"
    runtime.mkdir(mode=0o700)
    _project(root)
    first = discover_cached(root, None, runtime)
    assert first.app == "pkg.celery"
    assert len(list(runtime.glob("discovery-*.json"))) == 1
    with monkeypatch.context() as m:
        _cached_only(m)
        assert discover_cached(root, None, runtime) == first
    monkeypatch.setenv("TLRUN_NO_DISCOVERY_CACHE", "1")
    with monkeypatch.context() as m, pytest.raises(AssertionError):
        _cached_only(m)
        discover_cached(root, None, runtime)


def test_the_cache_notices_an_edit_a_new_file_and_a_deleted_file(tmp_path: Path) -> None:
    root, runtime = tmp_path / "proj", tmp_path / "run"
    runtime.mkdir(mode=0o700)
    _project(root)
    assert discover_cached(root, None, runtime).app == "pkg.celery"
    # An edit of the module that creates the app (in place: its folder's mtime does not change).
    folder_mtime = os.stat(root / "pkg").st_mtime_ns
    with open(root / "pkg" / "celery.py", "w") as fh:
        fh.write("from celery import Celery\n\nworker_app = Celery('x', broker='redis://')\n")
    assert os.stat(root / "pkg").st_mtime_ns == folder_mtime
    assert discover_cached(root, None, runtime).app == "pkg.celery:worker_app"
    _age(root)
    assert discover_cached(root, None, runtime).app == "pkg.celery:worker_app"  # cached again
    # A new file: a second package creating an app makes the answer ambiguous.
    (root / "other").mkdir()
    (root / "other" / "__init__.py").write_text("")
    (root / "other" / "celery.py").write_text("from celery import Celery\n\napp = Celery('y', broker='redis://')\n")
    with pytest.raises(ConfigError, match="2 candidates"):
        discover_cached(root, None, runtime)
    # A deleted file: back to one app.
    (root / "other" / "celery.py").unlink()
    assert discover_cached(root, None, runtime).app == "pkg.celery:worker_app"
    # A run file edited in place: what the project says ranks first.
    (root / "Procfile").write_text("worker: celery -A pkg.celery:worker_app worker\n")
    _age(root)
    assert discover_cached(root, None, runtime).app == "pkg.celery:worker_app"
    (root / "pkg" / "second.py").write_text("from celery import Celery\n\nsecond = Celery('z', broker='redis://')\n")
    with open(root / "Procfile", "w") as fh:
        fh.write("worker: celery -A pkg.second:second worker\n")
    assert discover_cached(root, None, runtime).app == "pkg.second:second"


def test_a_planted_or_foreign_cache_file_is_ignored(tmp_path: Path) -> None:
    root, runtime = tmp_path / "proj", tmp_path / "run"
    runtime.mkdir(mode=0o700)
    _project(root)
    assert discover_cached(root, None, runtime).app == "pkg.celery"
    (cache,) = runtime.glob("discovery-*.json")
    cache.unlink()
    os.mkfifo(cache)  # a FIFO under its name is never opened for reading (it would block)
    assert discover_cached(root, None, runtime).app == "pkg.celery"
    cache.unlink()
    cache.write_text('{"version": "0", "app": "evil"}')
    assert discover_cached(root, None, runtime).app == "pkg.celery"

"""The Celery version matrix: the end-to-end tests that depend on Celery's internals (tests marked
`matrix`: launch and the raw-ping verification, warm stop with a running task, the flush fix and its
deterministic race, the SIGQUIT requeue, fast stop, the spare reload, beat, NOT_CONSUMING, --debug), once per
supported Celery minor version, each at the newest patch with the kombu, billiard and redis-py that pip
resolves for it (constraints/celery-X.Y.txt, written by scripts/lock.sh).

    nox                          # every supported version
    nox -s "matrix(celery='5.5')"
    nox -- -x -k beat            # arguments after -- go to pytest

The full suite runs on the locked versions (requirements-dev.lock: Celery 5.7); scripts/test.sh runs it,
then this matrix for the other versions.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

SUPPORTED = ("5.5", "5.6", "5.7")


@nox.session
@nox.parametrize("celery", SUPPORTED)
def matrix(session: nox.Session, celery: str) -> None:
    session.install("-c", f"constraints/celery-{celery}.txt", "-e", ".[test]")
    installed = session.run("python", "-c", "import celery; print(celery.__version__)", silent=True)
    if not str(installed).startswith(celery + "."):
        session.error(f"constraints/celery-{celery}.txt installed Celery {installed!r}")
    workers = ["-n", "auto", "--dist", "worksteal"] if not session.posargs else []
    session.run("python", "-m", "pytest", "-m", "matrix", "-p", "no:cacheprovider", *workers, *session.posargs)

#!/usr/bin/env bash
# The whole test suite: lint, types, unit and end-to-end tests on the locked versions (each test starts its
# own redis-server), then the Celery version matrix (noxfile.py) for every other supported Celery.
# With arguments, only pytest runs, with them, on one core (scripts/test.sh tests/test_worker.py -x).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/ruff check src tests bench examples noxfile.py
.venv/bin/ruff format --check src tests bench examples noxfile.py
.venv/bin/mypy
# Both cores (pytest-xdist): every test owns its broker, ports, folders and app names, so any two run at once.
.venv/bin/python -m pytest -n "${TLRUN_TEST_WORKERS:-auto}" --dist worksteal
exec bash scripts/matrix.sh

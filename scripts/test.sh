#!/usr/bin/env bash
# The whole test suite: lint, types, unit and end-to-end tests (each test starts its own redis-server).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
.venv/bin/ruff check src tests bench examples
.venv/bin/ruff format --check src tests bench examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"

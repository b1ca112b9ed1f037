#!/usr/bin/env bash
# Regenerate requirements-dev.lock: the exact versions a fresh clone installs for development and tests.
# Run it after changing dependencies in pyproject.toml (the package's own ranges stay open for users).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
"$tmp/venv/bin/python" -m pip install --quiet -e ".[test]"
{
  echo "# Exact versions for development and tests (scripts/_venv.sh installs with these as constraints)."
  echo "# Regenerate with scripts/lock.sh after changing dependencies in pyproject.toml."
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^tlrun' | LC_ALL=C sort -f
} > requirements-dev.lock
echo "wrote requirements-dev.lock ($(grep -vc '^#' requirements-dev.lock) packages)"

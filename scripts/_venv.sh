# Sourced by the scripts: create .venv and install tlrun with its test tools, at the versions of
# requirements-dev.lock, whenever pyproject.toml or the lock changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tlrun-installed
want=$(cat pyproject.toml requirements-dev.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c requirements-dev.lock -e ".[test]"
  # The environment must be exactly the lock: a dependency added to pyproject.toml without scripts/lock.sh,
  # or a package left over in an old .venv, would test versions nobody locked.
  installed=$(.venv/bin/python -m pip freeze --exclude-editable 2>/dev/null | grep -v -i '^tlrun' | LC_ALL=C sort -f)
  # A line with an environment marker (`pkg==1.0 ; python_full_version < "3.11.3"`: redis-py needs
  # async-timeout before 3.11.3, Debian 12's python3 is 3.11.2) counts only where its marker holds.
  locked=$(.venv/bin/python -c '
import sys
from pip._vendor.packaging.markers import Marker
for line in open("requirements-dev.lock"):
    req, _, marker = line.strip().partition(";")
    if req and not req.startswith("#") and (not marker or Marker(marker.strip()).evaluate()):
        print(req.strip())
' | LC_ALL=C sort -f)
  if [ "$installed" != "$locked" ]; then
    echo "The environment differs from requirements-dev.lock (< installed, > locked):" >&2
    diff <(echo "$installed") <(echo "$locked") >&2 || true
    echo "After changing dependencies run scripts/lock.sh; for a stale .venv: rm -rf .venv" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server is not installed: install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)" >&2
  exit 1
fi

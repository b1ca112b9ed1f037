#!/usr/bin/env bash
# Regenerate requirements-dev.lock (the exact versions a fresh clone installs for development and tests) and
# one constraints file per supported Celery version (constraints/celery-X.Y.txt: what pip resolves for
# `pip install tlrun[test] 'celery==X.Y.*'`, the newest patch with its kombu, billiard and redis-py; the
# version matrix, noxfile.py, installs with it). Run it after changing dependencies in pyproject.toml (the
# package's own ranges stay open for users).
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
mkdir -p constraints
for celery in $("$tmp/venv/bin/python" -c "import ast, re; t = open('noxfile.py').read(); print(' '.join(ast.literal_eval(re.search(r'SUPPORTED = (\(.*?\))', t).group(1))))"); do
  "$tmp/venv/bin/python" -m pip install --quiet --dry-run --ignore-installed --report "$tmp/report.json" \
    ".[test]" "celery==$celery.*"
  {
    echo "# What pip resolves for tlrun[test] with celery==$celery.* (scripts/lock.sh); noxfile.py installs with it."
    "$tmp/venv/bin/python" -c "
import json
report = json.load(open('$tmp/report.json'))
for item in report['install']:
    meta = item['metadata']
    if meta['name'].lower() != 'tlrun':
        print(f\"{meta['name']}=={meta['version']}\")
" | LC_ALL=C sort -f
  } > "constraints/celery-$celery.txt"
  echo "wrote constraints/celery-$celery.txt ($(grep -m1 -i '^celery==' "constraints/celery-$celery.txt"))"
done

#!/usr/bin/env bash
# The Celery version matrix (noxfile.py) for every supported Celery but the locked one, whose full suite
# scripts/test.sh has just run. The sessions run at once (each installs its own environment, then its tests);
# their outputs follow one another when all are done. Arguments go to nox (scripts/matrix.sh -- -x).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
locked=$(.venv/bin/python -c "import celery; print('.'.join(celery.__version__.split('.')[:2]))")
sessions=()
for celery in $(.venv/bin/python -c "import noxfile; print(' '.join(noxfile.SUPPORTED))"); do
  if [ "$celery" != "$locked" ]; then
    sessions+=("matrix(celery='$celery')")
  fi
done
echo "Celery $locked: the full suite above; the matrix for: ${sessions[*]}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
pids=()
for i in "${!sessions[@]}"; do
  .venv/bin/nox --no-error-on-missing-interpreters -s "${sessions[$i]}" "$@" >"$out/$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for i in "${!sessions[@]}"; do
  wait "${pids[$i]}" || status=1
  cat "$out/$i.log"
done
exit "$status"

#!/usr/bin/env bash
# The Celery version matrix (noxfile.py) for every supported Celery but the locked one, whose full suite
# scripts/test.sh has just run. Arguments go to nox (scripts/matrix.sh -- -x).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
locked=$(.venv/bin/python -c "import celery; print('.'.join(celery.__version__.split('.')[:2]))")
sessions=()
for celery in $(.venv/bin/python -c "import noxfile; print(' '.join(noxfile.SUPPORTED))"); do
  if [ "$celery" != "$locked" ]; then
    sessions+=("matrix(celery='$celery')")
  fi
done
echo "Celery $locked: the full suite above; the matrix for: ${sessions[*]}"
exec .venv/bin/nox --no-error-on-missing-interpreters -s "${sessions[@]}" "$@"

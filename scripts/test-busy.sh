#!/usr/bin/env bash
# The suite on a busy machine, as our users' machines are: scripts/test.sh (with its arguments) while another
# project's Celery workers (their own redis-server, app and folder, outside every test's project) and two
# busy CPU loops run beside it. Everything started here is stopped by its pid when the run ends.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
here=$(mktemp -d "${TMPDIR:-/tmp}/tlrun-neighbour.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true  # each leads its own group (setsid): pool children go with it
  done
  rm -rf "$here"
}
trap cleanup EXIT
port=$(.venv/bin/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
setsid redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$here" >/dev/null &
pids+=("$!")
app="neighbour_$(basename "$here" | tr -dc 'a-zA-Z0-9')"
cat > "$here/$app.py" <<EOF
import time
from celery import Celery

app = Celery("$app", broker="redis://127.0.0.1:$port/0")


@app.task
def work(n):
    time.sleep(0.05)
    return n
EOF
for name in one two; do
  (cd "$here" && exec setsid "$OLDPWD/.venv/bin/python" -m celery -A "$app" worker -n "$name@%h" \
    --concurrency 2 --loglevel warning >"$here/$name.log" 2>&1) &
  pids+=("$!")
done
for _ in 1 2; do
  setsid .venv/bin/python -c "while True: pass" &
  pids+=("$!")
done
echo "test-busy.sh: beside the suite: redis-server :$port, 2 Celery workers of $app in $here, 2 CPU loops (pids ${pids[*]})"
bash scripts/test.sh "$@"

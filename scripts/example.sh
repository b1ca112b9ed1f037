#!/usr/bin/env bash
# tlrun on the example app. Uses CELERY_BROKER_URL or REDIS_URL when set; otherwise starts a private
# redis-server on a free port for this session and stops it on exit. Ctrl-C stops everything.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
redis_pid=""
cleanup() { if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null; wait "$redis_pid" 2>/dev/null; fi; }
trap cleanup EXIT
if [ -z "${CELERY_BROKER_URL:-}${REDIS_URL:-}" ]; then
  port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # Its own session, so the terminal's Ctrl-C reaches tlrun (which stops the worker) and not Redis.
  setsid redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  redis_pid=$!
  .venv/bin/python - "$port" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()
        break
    except OSError:
        time.sleep(0.05)
PY
  export CELERY_BROKER_URL="redis://127.0.0.1:$port/0"
  echo "example: private redis-server on port $port (pid $redis_pid) for this session"
fi
.venv/bin/tlrun worker -A examples.app --concurrency=2 "$@"

#!/usr/bin/env bash
# The example app, end to end.
#   scripts/example.sh          tlrun dev on the example app (creates .env from .env.example when missing).
#                               With no broker answering at the local Redis URL, tlrun starts a private
#                               redis-server for the session and stops it on exit. Ctrl-C stops everything.
#   scripts/example.sh send     in another terminal: send add(2, 3) and print its result.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
if [ ! -e .env ]; then
  cp .env.example .env
  echo "example.sh: created .env from .env.example"
fi
if [ "${1:-}" = "send" ]; then
  exec .venv/bin/python -m examples.send
fi
exec .venv/bin/tlrun dev --concurrency=2 "$@"

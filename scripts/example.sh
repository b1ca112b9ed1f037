#!/usr/bin/env bash
# tlrun dev on the example app. With no broker configured (or nothing answering at a local Redis URL),
# tlrun starts a private redis-server for the session and stops it on exit. Ctrl-C stops everything.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/tlrun dev -A examples.app --concurrency=2 "$@"

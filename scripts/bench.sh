#!/usr/bin/env bash
# The benchmark harness: tlrun against bare Celery, alternating A B A B, medians; writes bench/results.md.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/python bench/run.py "$@"

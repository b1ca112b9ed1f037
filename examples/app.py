"""A tiny Celery app for trying tlrun: `scripts/example.sh`, then `scripts/example.sh send`.

It uses the settings tlrun recommends against task loss (see docs/celery-settings.md).
The broker comes from CELERY_BROKER_URL (tlrun passes it to the worker), else REDIS_URL, else local Redis;
results go to the same Redis (CELERY_RESULT_BACKEND overrides), so `add.delay(2, 3).get()` works.
"""

import os
import time

from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/15"

app = Celery("examples", broker=BROKER)
app.conf.update(
    result_backend=os.environ.get("CELERY_RESULT_BACKEND") or BROKER,
    result_expires=3600,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=1800,
    broker_transport_options={"visibility_timeout": 3600},
    accept_content=["json"],
    task_serializer="json",
    result_serializer="json",
    broker_connection_retry_on_startup=True,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task
def fail() -> None:
    raise RuntimeError("this task always fails")

"""A tiny Celery app for trying tlrun: `tlrun worker -A examples.app`.

It uses the settings tlrun recommends against task loss (see README, "Recommended Celery settings").
The broker comes from CELERY_BROKER_URL (tlrun passes it to the worker), else REDIS_URL, else local Redis.
"""

import os
import time

from celery import Celery

app = Celery("examples", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    result_backend=os.environ.get("CELERY_RESULT_BACKEND"),
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
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

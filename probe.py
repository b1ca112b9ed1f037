import time, sys
t=time.monotonic()
from celery import Celery
print("import", round(time.monotonic()-t,3))
for url in ["redis://127.0.0.1:16398/0", "redis://:wrong@127.0.0.1:16399/0", "redis://:s3cret@127.0.0.1:16399/0", "amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:guest@127.0.0.1:5673//"]:
    app = Celery("probe", broker=url, set_as_current=False)
    t=time.monotonic()
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)
            r = app.control.ping(timeout=0.3, connection=conn)
            print(url, "ok", r, round(time.monotonic()-t,3))
    except Exception as e:
        print(url, type(e).__module__, type(e).__name__, str(e)[:150], round(time.monotonic()-t,3))

"""Celery 5 on Redis with a no-op task: the peer beside Bridgeway's queues (bench/jobs.py,
bench/jobs_brokers.py).

Run from its own venv (`python`): python3 -m venv /tmp/venv-celery &&
/tmp/venv-celery/bin/pip install 'celery[redis]'. On Redis db 15, a queue of its own: N
apply_async calls timed in the producer, then one worker (`pool`, `concurrency` processes: 2 on
this 2-core machine) started and timed until the queue and its unacked set are empty. Its end
to end figure is that drain; it includes the worker's start-up, so N must be large enough for
the drain to dominate.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

from common import log

CELERY_APP = """
from celery import Celery
app = Celery("bwbench", broker="redis://127.0.0.1:6379/15")
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False,
                broker_connection_retry_on_startup=True)

@app.task(name="noop")
def noop(n):
    return None

if __name__ == "__main__":
    import sys, time
    queue, n = sys.argv[1], int(sys.argv[2])
    started = time.perf_counter()
    for i in range(n):
        noop.apply_async((i,), queue=queue)
    print(time.perf_counter() - started)
"""


def celery_rate(python: str, n: int, pool: str, concurrency: int) -> dict[str, float]:
    import redis  # redis-py, only to watch the queue drain

    r = redis.Redis(host="127.0.0.1", port=6379, db=15)
    queue = f"bwbench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bwbench_celery.py").write_text(textwrap.dedent(CELERY_APP))
        env = {**os.environ, "PYTHONPATH": tmp}
        sent = subprocess.run(
            [python, str(Path(tmp, "bwbench_celery.py")), queue, str(n)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        enq = float(sent.stdout.strip().splitlines()[-1])
        log(f"celery: sent {n} in {enq:.2f}s; queue length {r.llen(queue)}")
        cmd = [
            python,
            "-m",
            "celery",
            "-A",
            "bwbench_celery",
            "worker",
            "-Q",
            queue,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "warning",
        ]
        started = time.perf_counter()
        worker = subprocess.Popen(
            cmd,
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while r.llen(queue) or r.hlen("unacked"):
                if worker.poll() is not None:
                    raise RuntimeError("celery worker exited")
                if time.perf_counter() - started > 300:
                    raise TimeoutError("celery did not drain its queue in 300 s")
                time.sleep(0.02)
            drain = time.perf_counter() - started
        finally:
            os.killpg(worker.pid, 15)
            worker.wait(timeout=30)
            r.delete(queue)
    log(f"celery: drained {n} in {drain:.2f}s")
    return {"enqueue": n / enq, "drain": n / drain, "e2e": n / drain}

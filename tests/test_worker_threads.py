"""The worker starts all its request threads at boot, so a burst never waits on Thread.start."""
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from bus_containers_provider.worker import start_threads

pytestmark = pytest.mark.timeout(30)


def named(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix))


def test_every_thread_of_the_pool_is_running_before_the_first_request():
    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="boot-test") as pool:
        start_threads(pool, 16)
        assert named("boot-test") == 16
        gate = threading.Barrier(17, timeout=10)
        futures = [pool.submit(gate.wait) for _ in range(16)]  # 16 requests at once: no new thread
        gate.wait()
        for future in futures:
            future.result(10)
        assert named("boot-test") == 16


def test_threads_that_cannot_all_start_in_time_are_reported_not_fatal(caplog):
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="short-test") as pool:
        start_threads(pool, 4, timeout=0.2)  # 4 parties can never meet on 2 threads
        assert "only some of the 4 request threads started" in caplog.text

"""The one way mnist-cloud waits for something: poll with a deadline, and optionally back off.

Every wait (EC2 states, SSH answering, Jupyter listening, a job ending, a cluster's rank 0) goes
through poll(); the caller says in one line what did not happen when it returns None.
"""

from __future__ import annotations

import math
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float, interval: float = 1.0, backoff: float = 1.0,
         max_interval: float = math.inf, on_wait: Callable[[float], None] | None = None,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> T | None:
    """Call check() until it returns something other than None, and return that; None once `timeout`
    seconds have passed. check() always runs once more at the deadline: the last sleep is cut short
    to end there, so a wait never overshoots it and never gives up a moment early. Each sleep is
    `backoff` times the one before, at most `max_interval`; `on_wait(seconds)` is told before each.
    An exception from check() ends the wait (the caller decides which errors mean "ask again")."""
    deadline = clock() + timeout
    delay = interval
    while True:
        result = check()
        if result is not None:
            return result
        left = deadline - clock()
        if left <= 0:
            return None
        if on_wait is not None:
            on_wait(min(delay, left))
        sleep(min(delay, left))
        delay = min(delay * backoff, max_interval)

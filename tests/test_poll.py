"""infra.poll: the one wait with a deadline, on a fake clock (no real sleeping)."""

from __future__ import annotations

import pytest

from infra.poll import poll


class Clock:
    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_returns_the_first_answer_without_sleeping_after_it():
    clock, answers = Clock(), iter([None, None, "up"])
    assert poll(lambda: next(answers), 60, interval=5, clock=clock, sleep=clock.sleep) == "up"
    assert clock.sleeps == [5, 5]


def test_gives_up_at_the_deadline_after_one_last_check_there():
    clock, checked_at = Clock(), []

    def never():
        checked_at.append(clock.now)

    assert poll(never, 12, interval=5, clock=clock, sleep=clock.sleep) is None
    assert clock.sleeps == [5, 5, 2]  # the last sleep ends at the deadline, not past it
    assert checked_at == [100, 105, 110, 112]


def test_backs_off_up_to_a_cap_and_says_each_wait():
    clock, said = Clock(), []
    assert poll(lambda: None, 100, interval=1, backoff=2, max_interval=15, on_wait=said.append,
                clock=clock, sleep=clock.sleep) is None
    assert clock.sleeps[:6] == [1, 2, 4, 8, 15, 15] and said == clock.sleeps
    assert sum(clock.sleeps) == 100


def test_an_error_from_the_check_ends_the_wait():
    clock = Clock()

    def broken():
        raise RuntimeError("not transient")

    with pytest.raises(RuntimeError):
        poll(broken, 60, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []

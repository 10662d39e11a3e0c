"""Overload control (switch.app.LoadWatch): how much new work to shed, from event-loop
lag, the UDP receive queue and the loop thread's load."""

from __future__ import annotations

from switch.app import LoadWatch


def run(watch: LoadWatch, samples: list[tuple[float, float]]) -> list[bool | None]:
    return [watch.sample(lag=lag, busy=busy) for lag, busy in samples]


def test_one_slow_turn_is_not_overload_but_a_lagging_loop_sheds_everything() -> None:
    watch = LoadWatch()
    assert run(watch, [(0.5, 0.3)]) == [None]  # one 500 ms pause (a collection, say)
    assert watch.shed == 0.0
    changes = run(watch, [(0.5, 0.3)] * 3)
    assert changes.count(True) == 1 and watch.shed == 1.0


def test_a_saturated_thread_sheds_a_growing_share_and_never_all() -> None:
    """A UDP listener past saturation: the loop keeps turning (no lag) but its thread
    never idles; the share grows by 10 % per sample up to 90 %."""
    watch = LoadWatch()
    changes = run(watch, [(0.0, 1.0)] * 8)  # about half a second of saturation
    assert changes.count(True) == 1
    first = watch.shed
    assert 0.0 < first < 0.5
    run(watch, [(0.0, 1.0)] * 30)
    assert watch.shed == LoadWatch.MAX_PARTIAL
    # a busy but coping switch (90 %) never starts shedding
    steady = LoadWatch()
    assert run(steady, [(0.01, 0.9)] * 100) == [None] * 100 and steady.shed == 0.0


def test_without_a_queue_signal_the_share_falls_back_to_zero_when_load_eases() -> None:
    watch = LoadWatch()
    run(watch, [(0.0, 1.0)] * 8)
    assert watch.shed > 0.0
    changes = run(watch, [(0.0, 0.3)] * 40)
    assert changes.count(False) == 1 and watch.shed == 0.0


def test_after_lag_the_share_drops_to_the_partial_ceiling_while_still_busy() -> None:
    watch = LoadWatch()
    run(watch, [(1.0, 1.0)] * 3)
    assert watch.shed == 1.0
    run(watch, [(0.0, 1.0)] * 10)  # the loop caught up, its thread is still saturated
    assert watch.shed == LoadWatch.MAX_PARTIAL


def test_samples_out_of_range_are_clamped() -> None:
    watch = LoadWatch()
    run(watch, [(-1.0, 5.0)] * 40)  # a clock step back, a thread time above wall time
    assert watch.lag == 0.0 and watch.busy <= 1.0


def test_with_a_receive_queue_signal_a_busy_switch_that_keeps_up_sheds_nothing() -> None:
    watch = LoadWatch()
    for _ in range(50):  # the thread is saturated, but no datagram waits
        assert watch.sample(lag=0.0, busy=1.0, queue=0.2) is None
    assert watch.shed == 0.0


def test_a_filling_receive_queue_raises_the_share_and_an_empty_one_lowers_it() -> None:
    watch = LoadWatch()
    assert watch.sample(lag=0.0, busy=1.0, queue=0.6) is True
    assert watch.shed == LoadWatch.STEP_UP
    for _ in range(20):
        watch.sample(lag=0.0, busy=1.0, queue=0.7)
    assert watch.shed == LoadWatch.MAX_PARTIAL
    watch.sample(lag=0.0, busy=0.9, queue=0.3)  # between the marks: hold
    assert watch.shed == LoadWatch.MAX_PARTIAL
    changes = [watch.sample(lag=0.0, busy=0.8, queue=0.0) for _ in range(40)]
    assert changes.count(False) == 1 and watch.shed == 0.0


def test_a_long_queue_that_shrinks_holds_the_share_instead_of_raising_it() -> None:
    watch = LoadWatch()
    for fill in (0.55, 0.65, 0.75):
        watch.sample(lag=0.0, busy=1.0, queue=fill)
    share = watch.shed
    for fill in (0.7, 0.6, 0.55, 0.51):  # enough is shed now: the backlog drains
        assert watch.sample(lag=0.0, busy=1.0, queue=fill) is None
    assert watch.shed == share

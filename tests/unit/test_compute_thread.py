"""The stage's compute thread: results, errors, ordering, cancellation and shutdown."""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import trio

from meshllm.pipeline.compute import ComputeThread


async def test_returns_value_and_runs_off_the_event_loop() -> None:
    ct = ComputeThread()
    loop_thread = threading.get_ident()
    try:
        where = await ct.run(threading.get_ident)
        assert where != loop_thread
        # One thread serves every job (the runtime is only ever touched from it).
        assert await ct.run(threading.get_ident) == where
        assert await ct.run(lambda: 6 * 7) == 42
    finally:
        ct.close()


async def test_exception_reaches_the_caller_and_thread_survives() -> None:
    ct = ComputeThread()
    try:
        with pytest.raises(ZeroDivisionError):
            await ct.run(lambda: 1 / 0)
        assert await ct.run(lambda: "still here") == "still here"
    finally:
        ct.close()


async def test_concurrent_callers_run_one_at_a_time_in_order() -> None:
    ct = ComputeThread()
    active, peak, order = [0], [0], []

    def job(i: int) -> int:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.005)
        order.append(i)
        active[0] -= 1
        return i

    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await ct.run(lambda: job(i))

    try:
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(call, i)
                await trio.sleep(0)
        assert results == {i: i for i in range(5)}
        assert peak[0] == 1
        assert sorted(order) == list(range(5))
    finally:
        ct.close()


async def test_cancelled_caller_waits_for_its_job() -> None:
    ct = ComputeThread()
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    try:
        with trio.move_on_after(0.02):
            await ct.run(slow)
            await trio.sleep(1)  # the deferred cancellation lands here
        # Like to_thread: the cancellation takes effect only once the job is done, so the
        # caller never goes on while its job still uses the runtime.
        assert finished.is_set()
        assert await ct.run(lambda: 1) == 1
    finally:
        ct.close()


async def test_closed_thread_refuses_work_and_close_is_idempotent() -> None:
    ct = ComputeThread()
    assert await ct.run(lambda: 1) == 1
    ct.close()
    ct.close()
    with pytest.raises(RuntimeError, match="closed"):
        await ct.run(lambda: 1)


def test_close_before_first_use_starts_nothing() -> None:
    before = threading.active_count()
    ComputeThread().close()
    assert threading.active_count() == before


async def test_a_finished_job_keeps_neither_its_function_nor_its_result() -> None:
    class Output:
        pass

    ct = ComputeThread()
    try:
        holder: dict[str, object] = {}

        def make() -> Output:
            holder["job"] = job  # a closure that reaches its own job: a cycle until run
            return Output()

        job = ct.start(make)
        out = await ct.wait(job)
        ref = weakref.ref(out)
        del out
        # Freed at once, not whenever the cyclic collector runs: a stage's outputs are
        # megabytes (logits), and the load test saw RSS climb while they waited.
        assert ref() is None
        assert job.fn is None
    finally:
        ct.close()


async def test_jobs_run_here_before_anyone_waits_never_block_their_thread() -> None:
    """A stage starts most steps on the thread that read the frame (run_here), and those
    are often done before the run loop waits for them, so their wake-ups pile up unread.
    Each used to be a blocking send: after a few hundred the socket was full and the next
    one hung the reader thread forever (a stage with a frame queued and no step, found by
    bench_balance). Thousands of them must all finish, and later waits still work."""
    ct = ComputeThread()
    try:
        done = threading.Event()

        def many() -> None:
            for i in range(20_000):
                ct.run_here(ct.claim(lambda i=i: i))
            done.set()

        ct.claim(lambda: None)  # the socket pair and the thread exist before the reader runs
        # A regression hangs the thread: fail, abandoning it, rather than hang the suite.
        with trio.move_on_after(60):
            await trio.to_thread.run_sync(many, abandon_on_cancel=True)
        assert done.is_set(), "a thread that ran jobs here hung on its wake-up"
        job = ct.claim(lambda: 7)
        await trio.to_thread.run_sync(ct.run_here, job)
        assert await ct.wait(job) == 7
        assert await ct.run(lambda: 8) == 8
    finally:
        ct.close()

"""One long-lived thread for a stage's ONNX Runtime steps, off the event loop.

``trio.to_thread.run_sync`` costs 130-380 µs a call on a small machine (a capacity limiter,
a context copy, a thread from the cache and a callback through the run's token), and a stage
pays it on every step, so several times per generated token. This thread takes jobs from a
queue and reports each one back through a socket pair the event loop already polls: about
half the cost. Like ``to_thread`` (without ``abandon_on_cancel``), a job always finishes
before its caller goes on, even when the caller is cancelled, so the runtime is never used
by two threads at once.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class _Job:
    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Callable[[], Any]):
        self.fn: Callable[[], Any] | None = fn
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class ComputeThread:
    def __init__(self, name: str = "meshllm-compute"):
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = trio.Lock()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._closed = False

    def _loop(self, wake: socket.socket) -> None:
        while (job := self._jobs.get()) is not None:
            if not self._execute(job, wake):
                return

    @staticmethod
    def _execute(job: _Job, wake: socket.socket) -> bool:
        try:
            assert job.fn is not None
            job.value = job.fn()
        except BaseException as exc:  # handed to the caller, like to_thread does
            job.error = exc
        # A closure often refers back to what refers to its job: without this, the cycle
        # (and the step's output arrays) would wait for the cyclic garbage collector.
        job.fn = None
        job.done = True
        try:
            wake.send(b"\0")
        except BlockingIOError:
            pass  # the socket is full of wake-ups already: the waiter will wake
        except OSError:  # closed while a cancelled caller's job ran: nobody is waiting
            return False
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    def _ready(self) -> None:
        if self._closed:
            raise RuntimeError("compute thread is closed")
        if self._wake_r is None:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            # Never blocking: a job that finished before anyone waited for it (a stage's
            # early start) leaves its wake-up unread, and a blocking send on a full socket
            # would hang the thread that ran it, and the stage with it.
            self._wake_w.setblocking(False)
            threading.Thread(
                target=self._loop, args=(self._wake_w,), name=self._name, daemon=True
            ).start()

    def start(self, fn: Callable[[], Any]) -> _Job:
        """Queue *fn* (jobs run in the order they are started); ``wait`` for its result."""
        self._ready()
        job = _Job(fn)
        self._jobs.put(job)
        return job

    def claim(self, fn: Callable[[], Any]) -> _Job:
        """A job for ``run_here`` to run on the caller's own thread, and ``wait`` to await.

        Only for a caller that knows no other job is queued or running (a stage that is
        idle): the jobs then still never overlap.
        """
        self._ready()
        return _Job(fn)

    def run_here(self, job: _Job) -> None:
        """Run a claimed job on this thread, and tell its waiter as the compute thread would."""
        wake = self._wake_w
        if wake is None:  # closed before it ran: nobody will wait
            return
        self._execute(job, wake)

    async def wait(self, job: _Job) -> Any:
        """The result of a started job (or its exception), once it has run."""
        wake_r = self._wake_r
        assert wake_r is not None
        async with self._lock:  # one waiter on the wake-up socket at a time
            with trio.CancelScope(shield=True):
                while not job.done:
                    await trio.lowlevel.wait_readable(wake_r)
                    self._drain(wake_r)
                # Wake-ups of jobs that were done before anyone waited: read them too.
                self._drain(wake_r)
        value, error = job.value, job.error
        job.value = job.error = None  # the caller owns them now
        if error is not None:
            raise error
        return value

    @staticmethod
    def _drain(wake_r: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            while wake_r.recv(4096):
                pass

    async def run(self, fn: Callable[[], T]) -> T:
        """Run *fn* on the thread and return (or raise) what it did."""
        return await self.wait(self.start(fn))  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the thread once its current job (if any) is done."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if self._wake_r is None or self._wake_w is None:
            return
        with contextlib.suppress(RuntimeError):  # outside a trio run nothing can be waiting
            trio.lowlevel.notify_closing(self._wake_r)
        self._wake_r.close()
        self._wake_w.close()

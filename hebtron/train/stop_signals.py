"""SIGUSR1 / SIGTERM taken synchronously by the training process, so its helper processes live
through them.

Why: Slurm delivers a stop signal to *every* process of the job step (proctrack/linuxproc or
cgroup), and torchrun forwards the one it gets with ``killpg`` to each rank's process group. A
rank's helpers are in that step and that group: the ``multiprocessing.Manager`` that
megatron-core's filesystem writer spawns at the first save and keeps for the whole run
(``filesystem_async._get_write_results_queue``), the writer processes it forks during every save,
the compiler processes torch.compile starts (``g++`` on CPU, Triton's on GPU). SIGTERM's and
SIGUSR1's default action kills them, so the checkpoint the signal asks for failed
(``BrokenPipeError`` from the dead Manager, or a ``CppCompileError`` when the signal landed during
a compile) and the run resumed from the previous interval.

How: the signals are *blocked* in the rank for as long as it trains. A blocked mask is inherited
across ``fork`` and ``exec`` (CPython itself spawns its resource tracker under a blocked mask,
bpo-33613), so every helper the rank starts keeps them pending instead of dying; Slurm's SIGKILL
after ``KillWait`` still ends them all. The rank takes the pending signals at step boundaries
(:func:`take_pending`, from the Trainer's stop check), which is where a signal handler's flag was
read before. The handlers stay installed, for threads that do not block the signals and for
code that runs a Trainer without :class:`StopSignals`.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)
_HAVE_MASK = hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigpending")


def _block() -> set[int]:
    """Block the stop signals in this thread; return the previous mask.

    Also starts multiprocessing's resource tracker, once, while they are blocked. Launching it,
    CPython (3.11 at least) blocks SIGINT/SIGTERM, spawns the tracker and then *unblocks* them
    (``SIG_UNBLOCK``, not the previous mask), so the first save's spawned helper (megatron-core's
    Manager) started with SIGTERM open and died of it (measured: its SigBlk lacked SIGTERM until
    the tracker was started here). Started now, it is not launched again; it inherits the blocked
    SIGUSR1 (it ignores SIGTERM itself), and the mask is blocked again after it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    except (ImportError, AttributeError, OSError):  # no tracker on this platform: nothing unblocks
        pass
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    return previous


def take_pending() -> int | None:
    """Consume the stop signals pending (blocked) for this thread; the first one's number, or None.

    ``sigpending`` + ``sigwait`` rather than ``sigtimedwait``: macOS has no ``sigtimedwait``, and
    ``sigwait`` on a signal already pending returns at once."""
    if not _HAVE_MASK:
        return None
    first = None
    for sig in sorted(signal.sigpending() & set(STOP_SIGNALS)):
        got = signal.sigwait({sig})
        first = got if first is None else first
    return first


@contextmanager
def blocked() -> Iterator[None]:
    """Block the stop signals in this thread for the body (no-op where they already are).

    Around a checkpoint save: a helper process the save starts inherits the blocked mask and so
    survives the signal that the save may be answering. On exit the previous mask comes back; a
    signal that arrived meanwhile is then delivered to the handler, which records it."""
    if not _HAVE_MASK:
        yield
        return
    previous = _block()
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopSignals:
    """Hold the stop signals for a training command: record, block, then poll with :meth:`take`.

    :meth:`hold` must run in the main thread before the threads and processes it should cover
    are started (a thread inherits the mask of the thread that creates it); :meth:`release`
    consumes what is still pending and puts the previous handlers and mask back, so a caller
    such as a test process is left as it was."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._handlers: dict[int, Any] = {}
        self._mask: set[int] | None = None

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)

    def hold(self) -> StopSignals:
        """Record-only handlers first (a signal delivered anyway, e.g. to a thread that was
        started earlier, is noted, never fatal), then the mask."""
        for sig in STOP_SIGNALS:
            try:
                self._handlers[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread: the mask below still applies to this thread
                pass
        if _HAVE_MASK:
            self._mask = _block()
        return self

    def take(self) -> int | None:
        """The first stop signal received so far (consuming pending ones), or None."""
        pending = take_pending()
        if pending is not None:
            self.received.append(pending)
        return self.received[0] if self.received else None

    def release(self, keep_handlers: bool = False) -> None:
        """Consume what is pending, put the mask back, and the previous handlers unless
        ``keep_handlers``.

        A process about to exit keeps the record-only handlers: a stop signal arriving then
        (torchrun signals the other ranks when one fails) would, with the default action, kill
        the rank before its exit handlers shut down the helpers that inherited the blocked mask,
        and those would be orphaned (seen: megatron-core's Manager and the resource tracker
        left running after a rank died of SIGTERM while exiting)."""
        self.take()
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None
        for sig, handler in self._handlers.items():
            if handler is not None and not keep_handlers:  # None: installed outside Python
                signal.signal(sig, handler)
        self._handlers.clear()

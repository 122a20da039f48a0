"""Preemption: SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 ask the run to save and exit.

SIGHUP is what a run started from a terminal gets when the terminal or the ssh session
closes; a process that ignores it (started under ``nohup``) keeps ignoring it.

Python runs signal handlers only when the main thread is back in the interpreter, and the
main thread spends most of its time inside one ``tf.function`` call running many steps.
So the C-level handler's wakeup file descriptor (``signal.set_wakeup_fd``) is watched by a
small thread that sets a ``tf.Variable`` flag at once; the compiled train loop reads that
flag before every step and stops early. The trainer then saves a checkpoint at the step
reached, waits until it is on disk and exits with :data:`EXIT_PREEMPTED`.

If another Python handler was installed for the signal before ``fit()`` (a scheduler's
helper, e.g. submitit's SIGUSR2 handler that requeues a SLURM job before its time limit), it
is called once the checkpoint is saved (:meth:`PreemptionWatch.chain`).

A second SIGINT (Ctrl-C twice) exits at once with code 130; the checkpoint directory stays
consistent, since nothing points at a checkpoint before its files are complete.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import tensorflow as tf

log = logging.getLogger("ckptkit")

#: What ``signal.signal`` takes and returns: a function, SIG_DFL/SIG_IGN, or None (installed
#: from outside Python).
Handler = Callable[[int, FrameType | None], Any] | int | None

#: Exit code after a signal-triggered save: "temporary failure, run again" (BSD EX_TEMPFAIL).
EXIT_PREEMPTED = 75
#: Exit code of a second Ctrl-C, which does not wait for a save.
EXIT_INTERRUPTED = 130

SIGNALS = tuple(
    s
    for s in (
        getattr(signal, "SIGTERM", None),
        getattr(signal, "SIGINT", None),
        getattr(signal, "SIGHUP", None),
        getattr(signal, "SIGUSR1", None),
        getattr(signal, "SIGUSR2", None),
    )
    if s is not None
)


def interactive() -> bool:
    """Whether Python runs a session a person types into (REPL, ``python -i``, IPython,
    Jupyter), which a Ctrl-C must not end."""
    import sys

    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    return bool(ipython and getattr(ipython, "get_ipython", lambda: None)())


class _Stop(BaseException):
    """Why and where ``fit()`` stopped after a signal (shared by Preempted and Interrupted)."""

    def __init__(
        self,
        signum: int | None,
        step: int,
        path: str | None,
        *,
        complete: bool = False,
        trained: bool = True,
        detail: str = "",
        exit_code: int = EXIT_PREEMPTED,
    ):
        self.signum, self.step, self.path = signum, step, path
        self.complete, self.trained, self.detail = complete, trained, detail
        self.exit_code = exit_code
        super().__init__(self._arg())

    def _arg(self):
        return str(self)

    def __reduce__(self):
        # Pickled across processes (a sweep's job in a joblib worker hands its exception to
        # the sweep): rebuilt from its fields, not from the exit code SystemExit holds.
        import functools

        return (
            functools.partial(
                type(self), complete=self.complete, trained=self.trained, detail=self.detail, exit_code=self.exit_code
            ),
            (self.signum, self.step, self.path),
        )

    def __str__(self) -> str:
        why = signal.Signals(self.signum).name if self.signum is not None else "another worker's preemption"
        if self.complete:
            return f"stopped by {why} after training finished at step {self.step} (saved {self.path}); {self.detail}"
        if not self.trained:
            held = (
                f"the run resumes from {self.path}"
                if self.path
                else "nothing was saved yet, the run starts from step 0"
            )
            return (
                f"stopped by {why} at step {self.step} before training (nothing new to "
                f"save; {held}); run the same command again to continue"
            )
        return f"stopped by {why} at step {self.step}; saved {self.path}; run the same command again to continue"


class Preempted(_Stop, SystemExit):
    """Raised by ``fit()`` after a signal: exits the process with code 75 once the step
    reached is saved, or with 0 when training had already finished and only the export was
    left (``complete``; the export is skipped and ``detail`` says how to make it)."""

    def _arg(self):
        return 0 if self.complete else self.exit_code


class _ExitWithMessage(SystemExit):
    """Ends the process with ``code`` (a SystemExit) after ``message`` was logged."""

    def __init__(self, code: int, message: str):
        self.message = message
        super().__init__(code)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # a sweep's job in another process hands it back
        return (type(self), (self.code, self.message))


class PeerLost(_ExitWithMessage):
    """A multi-worker run lost a worker: it exits with ``trainer.exit_code_peer_lost`` (the
    same as ``trainer.exit_code_preempted`` unless set), so a scheduler's requeue restarts it."""


class SweepStopping(_ExitWithMessage):
    """A job launched after its sweep was told to stop: it trains nothing and exits with
    ``trainer.exit_code_preempted``."""


class Interrupted(_Stop, KeyboardInterrupt):
    """Raised by ``fit()`` instead of :class:`Preempted` after a Ctrl-C in an interactive
    session (REPL, IPython, Jupyter): the step reached is saved, as after any signal, and
    the session goes on. ``fit()`` again resumes."""


def stop_exception(signum: int | None, step: int, path: str | None, **kw) -> Preempted | Interrupted:
    """What ``fit()`` raises after ``signum``: Interrupted for a Ctrl-C typed into an
    interactive session, else Preempted (which ends the process)."""
    if signum == signal.SIGINT and interactive():
        return Interrupted(signum, step, path, **kw)
    return Preempted(signum, step, path, **kw)


#: What a second Ctrl-C says, whatever was in flight: the last line of the run's output.
SECOND_CTRL_C = (
    "second Ctrl-C: exiting at once (status 130); the next launch resumes from the newest complete "
    "checkpoint, and a save this cut short never counts"
)


def _exit_interrupted() -> None:
    """Exit at once with 130, saying so in the last line (nothing ckptkit logs after it:
    a save finishing in another thread meanwhile would contradict it), leaving the terminal
    usable (a live bar hides the cursor)."""
    import sys

    log.disabled = True
    try:
        sys.stderr.write(("\x1b[?25h\n" if sys.stderr.isatty() else "") + SECOND_CTRL_C + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(EXIT_INTERRUPTED)


def _second_ctrl_c(_signum, _frame) -> None:
    _exit_interrupted()


class ExportInterrupted(BaseException):
    """Raised into the main thread by a signal while an export runs at the end of ``fit()``
    (a BaseException, so no ``except Exception`` in TensorFlow swallows it)."""


class PreemptionWatch:
    """While active (a context manager, main thread only), turns signals into ``flag``."""

    def __init__(self):
        self.flag = tf.Variable(False, trainable=False, name="ckptkit_stop_requested")
        self.signum: int | None = None
        self._old_handlers: dict[int, Handler] = {}
        self._old_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._sigints = 0
        self._chained: dict[int, Handler] = {}
        #: While true, a signal also raises ExportInterrupted in the main thread.
        self.interrupt_python = False
        #: Set when a Ctrl-C stops a script: until the process ends, another Ctrl-C exits
        #: at once and quietly (no KeyboardInterrupt traceback from the teardown).
        self.exiting_on_sigint = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum, _frame) -> None:
        # The watcher thread already saw this signal through the wakeup fd; this Python-level
        # handler only replaces the default action (KeyboardInterrupt, termination).
        if self._thread is None or not self._thread.is_alive():
            self._note(signum)
        if self.interrupt_python:
            # This handler can run before the watcher thread has read the signal: record it
            # here too (once; the watcher's _note then only counts a Ctrl-C).
            self.interrupt_python = False
            self._request(signum)
            raise ExportInterrupted(signum)

    def _note(self, signum: int) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= 2:
                _exit_interrupted()
        self._request(signum)

    def _request(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning(
                "%s received: finishing the current step and the save in flight, then exiting",
                signal.Signals(signum).name,
            )
        self.flag.assign(True)

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 16)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self._old_handlers:
                    self._note(signum)

    def __enter__(self) -> PreemptionWatch:
        self.flag.assign(False)
        self._old_handlers = {}
        self.signum, self._sigints = None, 0
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be handled from the main thread
        for s in SIGNALS:
            if s == getattr(signal, "SIGHUP", None) and signal.getsignal(s) == signal.SIG_IGN:
                continue  # nohup: the user asked for the run to outlive the terminal
            self._old_handlers[s] = signal.signal(s, self._on_signal)
        self._chained = dict(self._old_handlers)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._watch, args=(r,), daemon=True, name="ckptkit-preemption-watch")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, handler in self._old_handlers.items():
            quiet = s == signal.SIGINT and self.exiting_on_sigint
            signal.signal(s, _second_ctrl_c if quiet else handler)
        r, w = self._pipe
        os.close(w)  # the watcher's read returns b"" and it ends
        if self._thread is not None:
            self._thread.join(timeout=5)
        os.close(r)
        self._pipe = None

    def chain(self) -> None:
        """Hand the signal that stopped the run to the Python handler that was installed for
        it before (call after the save). Python's own Ctrl-C handler is not called: the run
        ends with :class:`Preempted` instead of a KeyboardInterrupt."""
        if self.signum is None:
            return
        handler = self._chained.get(self.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            log.info(
                "passing %s on to the handler installed before the run (%s)",
                signal.Signals(self.signum).name,
                getattr(handler, "__qualname__", handler),
            )
            handler(self.signum, None)

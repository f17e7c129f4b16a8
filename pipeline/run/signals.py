"""SIGINT and SIGTERM as one clean stop of the driver (``Interrupted``)."""

from __future__ import annotations

import signal
import threading


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the driver (a BaseException, like KeyboardInterrupt, so no
    ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interrupt(signum: int, _frame) -> None:
    """The handler: ignore further SIGINT and SIGTERM (one clean stop; repeated signals wait for
    it), then raise ``Interrupted``."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _set_handlers(handlers: dict) -> None:
    if threading.current_thread() is threading.main_thread():  # only the main thread takes signals
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def catch_interrupts() -> None:
    """Turn SIGINT and SIGTERM into ``Interrupted``."""
    _set_handlers({signal.SIGINT: interrupt, signal.SIGTERM: interrupt})


def restore_signals() -> None:
    """Python's own handlers again (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)."""
    _set_handlers({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL})

"""SIGINT and SIGTERM as one clean stop of the driver (``Interrupted``)."""

from __future__ import annotations

import signal
import threading

from ..runtime import main_stop


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the driver: the cause of the ``main_stop.Stop`` that the
    handler raises (a KeyboardInterrupt, the one exception Ray's blocking calls let through)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def interrupt(signum: int, _frame) -> None:
    """The handler: ignore further SIGINT and SIGTERM (one clean stop; repeated signals wait for
    it), then stop the main thread for ``Interrupted(signum)``."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    main_stop.stop(Interrupted(signum))


def _set_handlers(handlers: dict) -> None:
    if threading.current_thread() is threading.main_thread():  # only the main thread takes signals
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def catch_interrupts() -> None:
    """Turn SIGINT and SIGTERM into a stop for ``Interrupted`` (``main_stop``); no stop is
    recorded yet."""
    main_stop.forget()
    _set_handlers({signal.SIGINT: interrupt, signal.SIGTERM: interrupt})


def restore_signals() -> None:
    """Python's own handlers again (SIGINT raises KeyboardInterrupt, SIGTERM ends the process)."""
    _set_handlers({signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL})

"""Stopping the driver's main thread with a reason, from a signal handler.

Ray's blocking calls (``ray.get``, ``ray.wait``) run the signal handlers while they wait, but they
let through only a ``KeyboardInterrupt`` that a handler raises, and they raise it again as a plain
``KeyboardInterrupt``. Any other exception a handler raises there is printed and lost, and the
driver waits on (a job stopped by SIGTERM, or by a service that never started, would hang). So a
handler stops the main thread with ``stop(cause)``: it raises ``Stop``, a ``KeyboardInterrupt``,
and records ``cause``; wherever the exception arrives, ``reason(exc)`` gives the cause back.
"""

from __future__ import annotations

from typing import NoReturn


class Stop(KeyboardInterrupt):
    """The main thread stopped for ``cause`` (raised by ``stop``)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


_recorded: list[BaseException] = []


def stop(cause: BaseException) -> NoReturn:
    """Raise ``Stop(cause)`` here (in a signal handler: in the main thread), recording ``cause``."""
    _recorded[:] = [cause]
    raise Stop(cause)


def reason(exc: BaseException) -> BaseException:
    """What ended the main thread: the cause of a ``Stop``, or of the plain ``KeyboardInterrupt``
    a Ray call raised in its place; ``exc`` itself otherwise."""
    if isinstance(exc, Stop):
        return exc.cause
    if type(exc) is KeyboardInterrupt and _recorded:
        return _recorded[-1]
    return exc


def forget() -> None:
    """A new job starts: no stop recorded."""
    _recorded.clear()

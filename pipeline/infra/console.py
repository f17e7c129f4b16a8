"""What the jobs print on the console: each message one line, with no control character.

Text in messages may come from outside (shard names, values, exception texts): a terminal
escape sequence in it is shown as ``?``, never sent to the terminal.
"""

from __future__ import annotations

import errno
import os
import sys

#: Errors of a full or over-quota filesystem.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def printable(text: object) -> str:
    """``text`` as one line: runs of whitespace become one space, other control characters ``?``."""
    return "".join(ch if ch.isprintable() else "?" for ch in " ".join(str(text).split()))


def print_error(message: object) -> None:
    """``error: message`` on standard error, in one printable line."""
    print(f"error: {printable(message)}", file=sys.stderr, flush=True)


def causes(exc: BaseException):
    """``exc`` and every exception behind it (``__cause__``, ``__context__``, and Ray's ``cause``
    of a task error), each once."""
    seen, todo = set(), [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]


def no_space(exc: BaseException) -> str | None:
    """What the full-filesystem error behind ``exc`` says (e.g. ``No space left on device``), if
    that is what it is. A worker's error reaches the driver as text inside Ray's task error, so
    that text is read too."""
    for current in causes(exc):
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return current.strerror
    text = "\n".join(str(current) for current in causes(exc))
    for code in NO_SPACE:
        if f"[Errno {code}] {os.strerror(code)}" in text:
            return os.strerror(code)
    return None


def say(text: object, file=None) -> None:
    """One printable line on standard output (or ``file``), flushed."""
    print(printable(text), file=file or sys.stdout, flush=True)

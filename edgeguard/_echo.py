"""Cutting attacker-controlled text before it goes into an error, an event or a log line.

A reason that quotes what it refuses is useful; one that quotes all of it is an amplifier: a 16 MiB request
body with one unknown key became a 16 MiB error response, and each bad MQTT message a 256 KiB event and log
line. Every place that puts text it did not choose (a key, a name, a header, a parser's message that quotes
its input) into a message goes through :func:`echo` (one value, quoted) or :func:`cut` (a whole reason).
"""

from __future__ import annotations

__all__ = ["ECHO_MAX_CHARS", "REASON_MAX_CHARS", "cut", "echo"]

ECHO_MAX_CHARS = 80  # of one quoted value
REASON_MAX_CHARS = 400  # of a whole one-line reason (which may hold a few quoted values and a path)


def cut(text: object, limit: int = REASON_MAX_CHARS) -> str:
    """``str(text)`` on one line, at most about ``limit`` characters; a cut says how much was left out."""
    s = str(text)
    if "\n" in s or "\r" in s:
        s = s.replace("\r", "\\r").replace("\n", "\\n")  # a reason stays one line, even in a log file
    if len(s) <= limit:
        return s
    return f"{s[:limit]}...[{len(s) - limit} more characters cut]"


def echo(value: object, limit: int = ECHO_MAX_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters plus a marker: for quoting one value in a reason.

    Only the head of a long string is converted, so quoting a 16 MiB value costs no 16 MiB repr.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        head = repr(value[:limit])
        return f"{head}...[{len(value) - limit} more cut]"
    return cut(repr(value), limit)

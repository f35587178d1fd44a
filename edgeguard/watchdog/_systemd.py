"""systemd service notification (sd_notify(3)) without libsystemd.

The protocol is one AF_UNIX datagram per message, newline-separated ``KEY=VALUE`` lines, sent to the socket
named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the Linux abstract namespace (leading NUL byte).
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, when set, must be our pid) asks for ``WATCHDOG=1`` at least that
often; sd_watchdog_enabled(3) recommends kicking at half the interval, which :attr:`kick_interval_s` returns.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    """Sends READY/WATCHDOG/STATUS/STOPPING to systemd; every method is a no-op outside a notify service."""

    kind = "systemd"

    def __init__(self, *, environ: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address: str | None = None
        if raw:
            # Abstract-namespace sockets are spelled with '@' in the environment and a NUL on the wire.
            self._address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._sock: socket.socket | None = None
        self.kick_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        my_pid = os.getpid() if pid is None else pid
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(my_pid)):
            self.kick_interval_s = int(usec) / 1e6 / 2
        self.sent = 0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self._address is not None and self.kick_interval_s is not None

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Non-blocking: a receiver that stops reading must never stall the supervisor's loop.
                self._sock.setblocking(False)
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError:
            # systemd may be restarting; a lost notification is retried by the next kick, never fatal.
            self.errors += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self._send("\n".join(lines))

    def kick(self) -> bool:
        return self._send("WATCHDOG=1") if self.watchdog_enabled else False

    def status(self, text: str) -> bool:
        return self._send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self._send("\n".join(lines))

    def trigger(self) -> bool:
        """Ask systemd to act as if the watchdog had expired (``WATCHDOG=trigger``, systemd >= 243)."""
        return self._send("WATCHDOG=trigger")

    def close(self, *, clean: bool = True) -> None:
        del clean
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]

"""Linux watchdog device (``/dev/watchdog``), per Documentation/watchdog/watchdog-api.rst.

Opening the device arms it; every write (or WDIOC_KEEPALIVE) postpones the reset; writing the magic character
``V`` just before close disarms it ("magic close"), unless the driver was built or loaded with ``nowayout``,
in which case nothing can disarm it and the board resets ``timeout`` seconds after the last kick. We therefore
only open the device once the service is ready, and on a clean stop with nowayout we say in the log that a
reset follows unless something (systemd restarting us) opens it again in time.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
from pathlib import Path

from edgeguard.errors import WatchdogError

__all__ = ["DevWatchdog", "WDIOC_SETTIMEOUT", "WDIOC_GETTIMEOUT", "WDIOC_KEEPALIVE"]

_log = logging.getLogger("edgeguard.watchdog")

# _IOWR('W', 6, int), _IOR('W', 7, int), _IOR('W', 5, int) from <linux/watchdog.h>.
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
WDIOC_KEEPALIVE = 0x80045705


class DevWatchdog:
    """Keeps a Linux watchdog device alive. Works on any writable path; ioctls only on character devices."""

    kind = "dev"

    def __init__(self, *, path: Path, timeout_s: int, nowayout: bool | None = None) -> None:
        if not 1 <= timeout_s <= 3600:
            raise ValueError("watchdog timeout must be 1..3600 s")
        self.path = path
        self.requested_timeout_s = timeout_s
        self.timeout_s: int | None = None
        self._nowayout_setting = nowayout
        self.nowayout = False
        self._fd: int | None = None
        self.kicks = 0

    def open(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise WatchdogError(f"cannot open watchdog {self.path}: {exc.strerror}") from None
        self._fd = fd
        is_device = stat.S_ISCHR(os.fstat(fd).st_mode)
        self.nowayout = (
            self._nowayout_setting if self._nowayout_setting is not None else _sysfs_nowayout(self.path)
        )
        if is_device:
            try:
                buf = fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", self.requested_timeout_s))
                # The driver may round to what the hardware supports; it writes back the timeout in effect.
                self.timeout_s = struct.unpack("i", buf)[0]
            except OSError as exc:
                _log.warning("watchdog %s: cannot set timeout (%s); using the driver's", self.path, exc)
                try:
                    buf = fcntl.ioctl(fd, WDIOC_GETTIMEOUT, struct.pack("i", 0))
                    self.timeout_s = struct.unpack("i", buf)[0]
                except OSError:
                    self.timeout_s = None
        else:
            self.timeout_s = self.requested_timeout_s
        self.kick()

    @property
    def kick_interval_s(self) -> float:
        return max(0.5, (self.timeout_s or self.requested_timeout_s) / 3)

    def kick(self) -> bool:
        if self._fd is None:
            return False
        try:
            os.write(self._fd, b"\0")
        except OSError as exc:
            raise WatchdogError(f"watchdog {self.path} keepalive failed: {exc.strerror}") from None
        self.kicks += 1
        return True

    def close(self, *, clean: bool = True) -> None:
        """A clean stop writes the magic 'V' so the device disarms; an unclean one leaves it armed."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if clean:
                os.write(fd, b"V")
                if self.nowayout:
                    _log.warning(
                        "watchdog %s has nowayout: the board resets in %s s unless the service restarts",
                        self.path,
                        self.timeout_s,
                    )
        except OSError as exc:
            _log.warning("watchdog %s: magic close failed: %s", self.path, exc)
        finally:
            os.close(fd)


def _sysfs_nowayout(path: Path) -> bool:
    """Read ``/sys/class/watchdog/<dev>/nowayout`` when it exists (kernels >= 4.x); assume off otherwise."""
    try:
        name = path.resolve().name
        return Path("/sys/class/watchdog", name, "nowayout").read_text().strip() == "1"
    except OSError:
        return False

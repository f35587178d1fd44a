"""Opening a file that someone else can write: the one way the service reads such a file.

Key files, the trust store's ``.pub`` files, the revocation list, the API tokens file, the config file, the
watched directory's files and the sealed bundle all live where another user or process may write. Reading them
by path after a ``stat()`` lets that writer swap the file in between (a symlink to ``/dev/zero``, a FIFO that
never answers, a file grown to gigabytes). So: open once, without following a symbolic link in the last path
component (``O_NOFOLLOW``) and without blocking on a FIFO or a device (``O_NONBLOCK``); ``fstat`` that
descriptor; accept a regular file only; check its mode there; and read at most the limit from it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CheckedFile", "ErrorFactory", "open_checked", "read_checked"]

# The caller's error family, built from one line: ConfigError, KeyFileError, InputRejected, or OSError for
# the bundle file (an unreadable bundle is an I/O problem, not a verdict on the bundle).
ErrorFactory = Callable[[str], Exception]

# Group or others may read, write or run it (what ssh refuses for a private key).
GROUP_OTHER = stat.S_IRWXG | stat.S_IRWXO


@dataclass(frozen=True)
class CheckedFile:
    """The bytes of a regular file and the ``fstat`` of the very descriptor they were read from."""

    data: bytes
    mode: int  # permission bits only (S_IMODE)
    uid: int


def open_checked(path: Path, *, what: str, error: ErrorFactory) -> tuple[int, os.stat_result]:
    """An open read-only descriptor on the regular file at ``path`` and its ``fstat``; ``error(one line)``
    when it is missing, unreadable, a symbolic link, a directory or not a regular file. The caller closes
    the descriptor."""
    def refused(code: int, reason: str) -> Exception:
        exc = error(f"{what} {path} {reason}")
        if isinstance(exc, OSError):
            # The OSError family keeps errno and the path, so its callers can still tell a missing file (exit
            # 2, "no model") from an I/O fault: OSError(ENOENT, ...) is a FileNotFoundError.
            return OSError(code, f"{what} {reason}", str(path))
        return exc

    try:
        # O_NOFOLLOW: a link planted at the path is refused (ELOOP), not followed to wherever it points.
        # O_NONBLOCK: opening a FIFO or a tty must never hang the caller; it is refused below anyway.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise refused(errno.ENOENT, "not found") from None
    except IsADirectoryError:
        raise refused(errno.EISDIR, "is a directory, not a file") from None
    except PermissionError:
        raise refused(errno.EACCES, "cannot be read: permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refused(errno.ELOOP, "is a symbolic link (not followed; name the file itself)") from None
        raise refused(exc.errno or errno.EIO, f"cannot be opened: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise refused(errno.EISDIR, "is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise refused(errno.EINVAL, "is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_checked(
    path: Path,
    *,
    what: str,
    limit: int,
    error: ErrorFactory,
    private: bool = False,
) -> CheckedFile:
    """At most ``limit`` bytes of the regular file at ``path`` (``error`` when it holds more), read from the
    descriptor that was checked. ``private``: refuse a file that group or others may access, like ssh."""
    fd, st = open_checked(path, what=what, error=error)
    with os.fdopen(fd, "rb") as f:
        if private and st.st_mode & GROUP_OTHER:
            raise error(
                f"permissions {stat.S_IMODE(st.st_mode):04o} for {what} {path} are too open: it must not be "
                f"accessible by group/others (run: chmod 600 {path})"
            )
        # limit + 1: reading one byte more is how a file that grew past the limit after fstat is noticed.
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than the limit of {limit} bytes")
    return CheckedFile(data=data, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid)

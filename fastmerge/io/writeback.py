"""Large sequential writes that keep the page cache small (Linux; a no-op elsewhere).

A merge writes gigabytes it will not read again. Left to the kernel, those pages stay
dirty until the final fsync and then evict the inputs' pages — the ones the merge still
reads. On a machine whose page cache is capped (a container) that turns a 1 s write into
5 s of reclaim and a re-read of the inputs from disk. So, for each file:

* every STEP bytes written, writeback of that piece starts at once
  (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, asynchronous);
* a piece LAG steps behind is waited for and its now clean pages are dropped
  (``posix_fadvise(POSIX_FADV_DONTNEED)``), so at most ~LAG·STEP bytes stay cached;
* ``close`` (after the caller's fsync, which remains the durability point) drops the rest.

sync_file_range makes no durability promise; it only moves work earlier. An I/O error it
reports (EIO, ENOSPC) is raised as OSError like a failed write; a file system that does
not support it (EINVAL, ESPIPE, ENOSYS, EOPNOTSUPP) just turns the helper off.
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys

STEP = 32 << 20
LAG = 8

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
_UNSUPPORTED = {errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP}
_sync_file_range = None   # resolved on first use: the libc function, or False


def _libc_sync_file_range():
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    return _sync_file_range


class Writeback:
    """Streams the pages of one file being written (sequentially, from offset 0) to disk
    as it grows. Call ``written(end)`` after each write, ``close()`` after fsync."""

    def __init__(self, fd: int, step: int = STEP, lag: int = LAG):
        self.fd, self.step, self.lag = fd, step, lag
        self.fn = _libc_sync_file_range() or None
        self.started = 0   # writeback started for [0, started)
        self.dropped = 0   # written back and dropped for [0, dropped)

    def _sync(self, offset: int, nbytes: int, flags: int) -> None:
        if self.fn is None:
            return
        if self.fn(self.fd, offset, nbytes, flags) != 0:
            err = ctypes.get_errno()
            if err in _UNSUPPORTED:
                self.fn = None
                return
            raise OSError(err, os.strerror(err))

    def _drop(self, offset: int, nbytes: int) -> None:
        try:
            os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass   # advice only

    def written(self, end: int) -> None:
        """Bytes [0, end) of the file are written."""
        while self.fn is not None and end - self.started >= self.step:
            self._sync(self.started, self.step, _WRITE)
            self.started += self.step
            while self.fn is not None and self.started - self.dropped > self.lag * self.step:
                self._sync(self.dropped, self.step, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                self._drop(self.dropped, self.step)
                self.dropped += self.step

    def close(self) -> None:
        """After fsync: drop every page of the file that is still cached."""
        self._drop(0, 0)

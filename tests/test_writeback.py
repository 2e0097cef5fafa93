"""fastmerge.io.writeback: early writeback and page dropping around sequential writes."""
import ctypes
import errno
import os

import pytest
import torch

from fastmerge.io import writeback as W
from fastmerge.io.safetensors_file import SafetensorsFile, SafetensorsWriter


class Recorder:
    """Stands in for libc's sync_file_range: records calls, optionally fails."""

    def __init__(self, fail_errno=None):
        self.calls, self.fail_errno = [], fail_errno

    def __call__(self, fd, offset, nbytes, flags):
        self.calls.append((offset, nbytes, flags))
        if self.fail_errno is not None:
            ctypes.set_errno(self.fail_errno)
            return -1
        return 0


def test_starts_each_step_and_waits_lag_steps_behind(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    wb = W.Writeback(fd, step=100, lag=2)
    wb.fn = rec = Recorder()
    for end in (50, 250, 260, 520):
        wb.written(end)
    os.close(fd)
    starts = [(o, n) for o, n, f in rec.calls if f == W._WRITE]
    waits = [(o, n) for o, n, f in rec.calls if f == W._WAIT_BEFORE | W._WRITE | W._WAIT_AFTER]
    assert starts == [(0, 100), (100, 100), (200, 100), (300, 100), (400, 100)]
    assert waits == [(0, 100), (100, 100), (200, 100)]   # at most lag steps stay cached
    assert (wb.started, wb.dropped) == (500, 300)


def test_io_error_is_raised_and_unsupported_turns_it_off(tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        wb = W.Writeback(fd, step=10, lag=1)
        wb.fn = Recorder(errno.EIO)
        with pytest.raises(OSError) as err:
            wb.written(10)
        assert err.value.errno == errno.EIO
        wb = W.Writeback(fd, step=10, lag=1)
        wb.fn = rec = Recorder(errno.ESPIPE)
        wb.written(100)                              # no error: the helper is off
        assert wb.fn is None and len(rec.calls) == 1
    finally:
        os.close(fd)


def test_real_file_round_trip(tmp_path):
    """With the real system call and a tiny step, a written file reads back exactly."""
    data = torch.arange(300_000, dtype=torch.float32)
    path = tmp_path / "x.safetensors"
    w = SafetensorsWriter(path, [("x", torch.float32, (300_000,))])
    w._writeback = W.Writeback(w._fd, step=1 << 16, lag=3)
    for part in data.split(12345):
        w.write(part)
    w.close()
    if W._libc_sync_file_range():
        assert w._writeback.dropped > 0
    out = torch.empty(300_000)
    SafetensorsFile(path).read_into("x", out)
    assert torch.equal(out, data)

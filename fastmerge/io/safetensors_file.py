"""Safetensors files read and written by fastmerge, for files that come from strangers.

Format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON

    {"__metadata__": {str: str},                       (optional)
     NAME: {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}

(padded with trailing spaces), then the data section; offsets count from its first byte
(file byte 8 + N).

``SafetensorsFile`` checks the whole header before anything trusts it: the length is
inside the file and under ``HEADER_LIMIT``, the JSON is an object without duplicate keys,
every entry has exactly dtype/shape/data_offsets, the dtype is known, the byte range lies
inside the data section and has exactly numel·itemsize bytes, and no two tensors share a
byte. Gaps between tensors and trailing bytes are tolerated (never read). Two ways to get
data, both safe from several threads: ``read_into`` copies it with ``os.preadv`` into the
caller's tensor; ``view`` maps a range (private ``mmap``, no copy: what the CPU merge
uses), unmapped when the tensor is freed, so memory grows with the views held, never with
the file. Each re-checks the file's current size first, so a file truncated after it was
opened is reported, never read past.

``SafetensorsWriter`` writes the header for a list of (name, dtype, shape) first, then
takes the data strictly in order, hashing it as it goes; ``close()`` returns the sha256.
Byte order is the host's, which must be little-endian like the format.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import hashlib
import json
import math
import mmap
import operator
import os
import reprlib
import stat
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError, OutputError
from .writeback import Writeback

HEADER_LIMIT = 100 * 1024 * 1024
"""Largest header accepted (bytes); the format's own reference implementation uses 100 MB."""
MAX_NDIM = 64
"""Most dimensions accepted for one tensor."""
_MAX_EXTENT = 2**63 - 1  # torch computes strides in int64
_IO_STEP = 1 << 30       # bytes per preadv call (Linux caps one call near 2 GiB)
_WRITE_PIECE = 4 << 20   # bytes hashed, then written, at a time (bench/README.md: 40% less
                         # system time than hashing a whole tensor after writing it)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # never block opening a FIFO; no effect on files
_CAN_MAP = hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap.mmap, "madvise")
_MADV_POPULATE_READ = 22   # Linux 5.14+: fill the page tables of a range, read-only

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
    raise ImportError("fastmerge.io reads safetensors (little-endian) on little-endian hosts only")


def _dtype_table() -> dict[str, torch.dtype]:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    for code, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[code] = getattr(torch, attr)
    return table


DTYPES: dict[str, torch.dtype] = _dtype_table()
"""Safetensors dtype code -> torch dtype, for the dtypes fastmerge reads and writes."""
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 2, 6, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 60, 60, 40


def _short(value) -> str:
    """repr() of an untrusted JSON value, bounded in length and depth."""
    return _repr.repr(value)


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``offset`` is the absolute byte offset in the file
    (0 for in-memory tensors) and ``nbytes`` = numel·itemsize."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


# -- helpers shared with fastmerge.io.checkpoint ---------------------------------------------

class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_object(pairs):
    """object_pairs_hook for json.loads: a repeated key is an error, not 'last one wins'."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def loads_strict_json(text: str, where: str, what: str = "JSON"):
    """json.loads that rejects duplicate keys; every failure is an InputError naming ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as exc:
        raise InputError(f"{where}: {what} repeats the key {_short(exc.key)} (duplicate keys "
                         "are ambiguous; refusing the file)") from None
    except RecursionError:
        raise InputError(f"{where}: {what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, too many digits in an integer
        raise InputError(f"{where}: {what} is not valid JSON: {exc}") from None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates written as \\udXXX escapes
        return False
    return True


def check_range(where: str, info: TensorInfo, start, count) -> tuple[int, int]:
    """Validate a read of ``count`` elements from element ``start``; count None: to the end."""
    numel = info.numel
    if type(start) is not int or not 0 <= start <= numel:
        raise ValueError(f"{where}: tensor {info.name!r}: start {start!r} is outside "
                         f"0..{numel}")
    if count is None:
        count = numel - start
    if type(count) is not int or not 0 <= count <= numel - start:
        raise ValueError(f"{where}: tensor {info.name!r}: count {count!r} from start {start} "
                         f"runs past its {numel} elements")
    return start, count


def byte_view(out: torch.Tensor, nbytes: int, where: str) -> torch.Tensor:
    """The first ``nbytes`` bytes of the contiguous CPU tensor ``out``, as a uint8 view."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: out must be a torch.Tensor, got {type(out).__name__}")
    if out.device.type != "cpu" or out.layout != torch.strided or not out.is_contiguous():
        raise ValueError(f"{where}: out must be a contiguous CPU tensor (got device "
                         f"{out.device}, layout {out.layout}, contiguous={out.is_contiguous()})")
    have = out.numel() * out.element_size()
    if have < nbytes:
        raise ValueError(f"{where}: out holds {have} bytes, the read needs {nbytes}")
    return out.detach().reshape(-1).view(torch.uint8)[:nbytes]


def tensor_bytes(data: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (copied to a contiguous CPU tensor only when needed)."""
    flat = data.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


# -- header parsing ---------------------------------------------------------------------------

def _shape_of(where: str, shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{where}: shape {_short(shape)} is not a list of non-negative "
                         "integers")
    if len(shape) > MAX_NDIM:
        raise InputError(f"{where}: shape has {len(shape)} dimensions, more than the "
                         f"{MAX_NDIM} accepted")
    extent = 1
    for d in shape:  # what torch's int64 strides must hold (a 0 dim counts as 1)
        extent *= max(d, 1)
        if extent > _MAX_EXTENT:
            raise InputError(f"{where}: shape {_short(shape)} is too large (its size "
                             "overflows 64-bit indexing)")
    return tuple(shape)


def parse_header(raw: bytes, data_len: int, data_start: int, where: str
                 ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header (the N bytes after the length) for a data section of ``data_len``
    bytes starting at file byte ``data_start``. Returns (tensors in data-offset order,
    metadata); raises InputError naming ``where``, the tensor and the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: header is not valid UTF-8 ({exc.reason} at header byte "
                         f"{exc.start})") from None
    doc = loads_strict_json(text, where, "header")
    if not isinstance(doc, dict):
        raise InputError(f"{where}: header is a JSON {_json_type(doc)}, not an object")

    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _valid_unicode(k) and _valid_unicode(v)
            for k, v in metadata.items()):
        raise InputError(f"{where}: __metadata__ must be an object of string values, got "
                         f"{_short(metadata)}")

    found = []
    for name, entry in doc.items():
        here = f"{where}: tensor {_short(name)}"
        if not _valid_unicode(name):
            raise InputError(f"{here}: name is not valid Unicode")
        if not isinstance(entry, dict):
            raise InputError(f"{here}: header entry is a JSON {_json_type(entry)}, not an "
                             "object")
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            missing = sorted({"dtype", "shape", "data_offsets"} - set(entry))
            extra = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
            raise InputError(f"{here}: entry must have exactly dtype, shape and data_offsets "
                             f"(missing {missing}, unexpected {_short(extra)})")
        code = entry["dtype"]
        if not isinstance(code, str) or code not in DTYPES:
            raise InputError(f"{here}: unknown or unsupported dtype {_short(code)} "
                             f"(supported: {', '.join(DTYPES)})")
        dtype = DTYPES[code]
        shape = _shape_of(here, entry["shape"])
        offsets = entry["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise InputError(f"{here}: data_offsets {_short(offsets)} must be two integers "
                             "[begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise InputError(f"{here}: data_offsets [{_short(begin)}, {_short(end)}] need "
                             "0 <= begin <= end")
        if end > data_len:
            raise InputError(f"{here}: data_offsets [{begin}, {_short(end)}] run past the end "
                             f"of the data section ({data_len} bytes): the file is truncated "
                             "or corrupt")
        numel = math.prod(shape)
        if numel * dtype.itemsize != end - begin:
            raise InputError(f"{here}: data_offsets [{begin}, {end}] hold {end - begin} bytes "
                             f"but shape {list(shape)} of {code} needs "
                             f"{numel * dtype.itemsize} ({numel} x {dtype.itemsize})")
        found.append(TensorInfo(name, dtype, shape, data_start + begin, end - begin))

    found.sort(key=lambda t: (t.offset, t.nbytes))  # stable: header order among equals
    last = None  # the non-empty tensor reaching furthest so far
    for info in found:
        if info.nbytes == 0:
            continue
        if last is not None and info.offset < last.offset + last.nbytes:
            a = (last.offset - data_start, last.offset - data_start + last.nbytes)
            b = (info.offset - data_start, info.offset - data_start + info.nbytes)
            raise InputError(f"{where}: tensors {_short(last.name)} {list(a)} and "
                             f"{_short(info.name)} {list(b)} overlap")
        if last is None or info.offset + info.nbytes > last.offset + last.nbytes:
            last = info
    return {t.name: t for t in found}, metadata


# -- raw file I/O -----------------------------------------------------------------------------

def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _open_regular(path: Path, where: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{where}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc_madvise() if sys.platform.startswith("linux") else None


def _populate(mapped: mmap.mmap, address: int, length: int) -> None:
    """Fill the page tables of the fresh mapping at [address, address+length), reading pages
    from disk as needed; an OSError (EFAULT) when a page cannot be read. Through ctypes,
    which releases the GIL (mmap.madvise holds it for the whole call, stalling the merge
    thread while a prefetch thread populates). Older kernels refuse the advice (EINVAL):
    their pages are mapped on first touch instead."""
    if _MADVISE is not None:
        if _MADVISE(address, length, _MADV_POPULATE_READ) == 0:
            return
        err = ctypes.get_errno()
    else:
        try:
            mapped.madvise(_MADV_POPULATE_READ)
            return
        except OSError as exc:
            err = exc.errno
    if err not in (errno.EINVAL, errno.ENOSYS):
        raise OSError(err, os.strerror(err))


def _pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    """Fill ``buf`` from file offset ``offset``; a short read is an InputError (truncated)."""
    done, total = 0, buf.nbytes
    while done < total:
        try:
            n = os.preadv(fd, [buf[done:done + _IO_STEP]], offset + done)
        except InterruptedError:  # pragma: no cover - retried by Python already
            continue
        except OSError as exc:
            raise InputError(f"{where}: read failed at byte {offset + done}: "
                             f"{exc.strerror or exc}") from None
        if n == 0:
            raise InputError(f"{where}: file is truncated: read stopped at byte "
                             f"{offset + done}, {total - done} bytes short")
        done += n


class SafetensorsFile:
    """One validated safetensors file. ``tensors``: name -> TensorInfo in data-offset order;
    ``metadata``: the ``__metadata__`` strings ({} when absent)."""

    def __init__(self, path):
        self.path = Path(path)
        self._where = str(self.path)
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False
        fd, st = _open_regular(self.path, self._where)
        try:
            self.tensors, self.metadata = self._parse(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self._identity = _identity(st)

    def _parse(self, fd: int, size: int):
        where = self._where
        if size < 8:
            raise InputError(f"{where}: file has {size} bytes, too few for a safetensors "
                             "header (truncated, or not a safetensors file)")
        prefix = bytearray(8)
        _pread_into(fd, memoryview(prefix), 0, where)
        n = int.from_bytes(prefix, "little")
        if n > HEADER_LIMIT:
            raise InputError(f"{where}: header length {n} exceeds the {HEADER_LIMIT}-byte "
                             "limit (corrupt, or not a safetensors file)")
        if n > size - 8:
            raise InputError(f"{where}: header length {n} runs past the end of the file "
                             f"({size} bytes): truncated, or not a safetensors file")
        raw = bytearray(n)
        _pread_into(fd, memoryview(raw), 8, where)
        return parse_header(bytes(raw), size - 8 - n, 8 + n, where)

    # -- file descriptor bookkeeping (Checkpoint keeps only a few open) --------------------
    def _acquire(self) -> int:
        with self._lock:
            if self._closed:
                raise ValueError(f"{self._where}: read from a closed SafetensorsFile")
            if self._fd is None:
                fd, st = _open_regular(self.path, self._where)
                if _identity(st) != self._identity:
                    os.close(fd)
                    raise InputError(f"{self._where}: the file changed on disk since it was "
                                     "opened (size, inode or modification time differ)")
                self._fd = fd
            self._users += 1
            return self._fd

    def _release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closed and self._users == 0 and self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _drop_fd(self) -> bool:
        """Close the descriptor if no read is using it (it reopens on the next read, after
        checking the file is still the one parsed). True when no descriptor is held."""
        with self._lock:
            if self._fd is not None and self._users == 0:
                os.close(self._fd)
                self._fd = None
            return self._fd is None

    # -- reading --------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self._where}: no tensor {name!r}") from None

    def read_into(self, name: str, out: torch.Tensor, start: int = 0,
                  count: int | None = None) -> torch.Tensor:
        """Copy the raw bytes of elements [start, start+count) of tensor ``name`` into the
        contiguous CPU tensor ``out`` (any dtype, at least count·itemsize bytes). Returns out."""
        info = self.info(name)
        start, count = check_range(self._where, info, start, count)
        nbytes = count * info.itemsize
        dst = byte_view(out, nbytes, f"{self._where}: tensor {name!r}")
        if nbytes == 0:
            return out
        offset = info.offset + start * info.itemsize
        where = f"{self._where}: tensor {name!r}"
        fd = self._acquire_for(where, offset + nbytes)
        try:
            _pread_into(fd, memoryview(dst.numpy()), offset, where)
        finally:
            self._release()
        return out

    def _acquire_for(self, where: str, end: int) -> int:
        """``_acquire`` after checking the file still has ``end`` bytes (InputError if not)."""
        fd = self._acquire()
        size = os.fstat(fd).st_size
        if end > size:
            self._release()
            raise InputError(f"{where}: file is truncated: it now has {size} bytes but the "
                             f"read needs bytes up to {end} (the file shrank after it was "
                             "opened)")
        return fd

    def view(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of tensor ``name`` as a flat CPU tensor of its dtype
        that maps the file's pages instead of copying them (``mmap``, private: writing to it
        never reaches the file). The mapping lives as long as the tensor; its page tables
        are filled at once (``MADV_POPULATE_READ``), so compute never stops on page faults
        and a page that cannot be read is an InputError here, like a failed pread. The range
        is checked against the file's current size first. Where mapping is not possible (no
        POSIX mmap, or an offset not a multiple of the element size) the bytes are read into
        a new tensor instead, with the same result.

        Caveat of every mapped read (safetensors' and torch.load's included): a file cut
        short by another process while a view of its end is in use, or (on kernels before
        5.14, which fill pages on first touch) a disk error, makes the process fail with
        SIGBUS instead of an InputError."""
        info = self.info(name)
        start, count = check_range(self._where, info, start, count)
        offset = info.offset + start * info.itemsize
        nbytes = count * info.itemsize
        if nbytes == 0 or offset % info.itemsize or not _CAN_MAP:
            return self.read_into(name, torch.empty(count, dtype=info.dtype), start, count)
        lead = offset % mmap.ALLOCATIONGRANULARITY
        fd = self._acquire_for(f"{self._where}: tensor {name!r}", offset + nbytes)
        try:
            mapped = mmap.mmap(fd, lead + nbytes, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - lead)
        except OSError as exc:
            raise InputError(f"{self._where}: tensor {name!r}: cannot map bytes "
                             f"{offset}..{offset + nbytes}: {exc.strerror or exc}") from None
        finally:
            self._release()
        tensor = torch.frombuffer(mapped, dtype=info.dtype, count=count, offset=lead)
        try:
            _populate(mapped, tensor.data_ptr() - lead, lead + nbytes)
        except OSError as exc:
            del tensor
            mapped.close()
            raise InputError(f"{self._where}: tensor {name!r}: read failed for bytes {offset}.."
                             f"{offset + nbytes}: {exc.strerror or exc} (an I/O error, or the "
                             "file shrank)") from None
        return tensor

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in a new CPU tensor of its dtype and shape."""
        info = self.info(name)
        out = torch.empty(info.shape, dtype=info.dtype)
        return self.read_into(name, out)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None and self._users == 0:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        _close_quietly(getattr(self, "_fd", None))

    def __repr__(self) -> str:
        return f"SafetensorsFile({self._where!r}, {len(self.tensors)} tensors)"


# -- writing ----------------------------------------------------------------------------------

def _int_shape(shape) -> tuple[int, ...] | None:
    """A writer's shape as a tuple of non-negative ints (torch.Size, numpy ints welcome)."""
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        return None
    if any(isinstance(d, bool) for d in shape) or any(d < 0 for d in dims):
        return None
    return dims


def _build_header(entries, metadata) -> tuple[bytes, list[tuple[str, torch.dtype, int]]]:
    doc: dict = {}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"metadata must be a dict of str to str, got {_short(metadata)}")
        doc["__metadata__"] = dict(metadata)
    plan = []
    begin = 0
    for entry in entries:
        name, dtype, shape = entry
        if not isinstance(name, str) or name == "__metadata__" or name in doc:
            raise ValueError(f"tensor name {name!r} is not a str, is reserved or is repeated")
        if dtype not in DTYPE_CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors "
                             f"by fastmerge (supported: {', '.join(map(str, DTYPE_CODES))})")
        shape = _int_shape(shape)
        if shape is None:
            raise ValueError(f"tensor {name!r}: shape {entry[2]!r} is not non-negative integers")
        nbytes = math.prod(shape) * dtype.itemsize
        doc[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(d) for d in shape],
                     "data_offsets": [begin, begin + nbytes]}
        plan.append((name, dtype, begin + nbytes))
        begin += nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, plan


def _close_quietly(fd: int | None) -> None:
    """Close a descriptor an object still held when it was collected (errors ignored)."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class SafetensorsWriter:
    """Writes one safetensors file: the header for ``entries`` [(name, dtype, shape)] in that
    order at once, then the data strictly in order through ``write`` (tensors or bytes-like,
    any number of calls per tensor). Nothing is buffered; everything written is hashed.

    ``close()`` checks every declared byte arrived (else OutputError), fsyncs and returns the
    hex sha256 of the whole file. Pages are written back and dropped from the page cache as
    the file grows (``Writeback``), so a large output does not evict the inputs. OSError (e.g. disk full) propagates unchanged so callers can
    tell I/O failures apart. ``abort()`` closes and removes the file.
    """

    def __init__(self, path, entries, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header, plan = _build_header(list(entries), metadata)
        self._names = [p[0] for p in plan]
        self._dtypes = [p[1] for p in plan]
        self._ends = [p[2] for p in plan]
        self._total = self._ends[-1] if self._ends else 0
        self._pos = 0
        self._sha = hashlib.sha256()
        self._digest: str | None = None
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                       | _O_CLOEXEC, 0o644)
        self._offset = 0   # bytes in the file
        self._writeback = Writeback(self._fd)
        try:
            self._write_raw(memoryview(header))
        except BaseException:
            self._close_fd()
            raise

    @property
    def position(self) -> int:
        """Data bytes written so far (the header not counted)."""
        return self._pos

    @property
    def total(self) -> int:
        """Data bytes the header declares."""
        return self._total

    @property
    def size(self) -> int:
        """Bytes written to the file so far, header included (its size once closed)."""
        return self._offset

    def _entry_at(self, pos: int) -> int:
        return bisect.bisect_right(self._ends, pos)  # first entry whose end is past pos

    def write(self, data) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: write to a closed SafetensorsWriter")
        if isinstance(data, torch.Tensor):
            buf = tensor_bytes(data)
        else:
            buf = memoryview(data).cast("B")
        n = buf.nbytes
        if n == 0:
            return
        if self._pos + n > self._total:
            raise OutputError(f"{self.path}: writing {n} bytes at data byte {self._pos} runs "
                              f"past the {self._total} bytes the header declares")
        if isinstance(data, torch.Tensor):
            for i in range(self._entry_at(self._pos), self._entry_at(self._pos + n - 1) + 1):
                if self._dtypes[i] != data.dtype:
                    raise ValueError(f"{self.path}: tensor {self._names[i]!r} is "
                                     f"{self._dtypes[i]}, got data of {data.dtype}")
        self._write_raw(buf)
        self._pos += n

    def _write_raw(self, buf: memoryview) -> None:
        for start in range(0, buf.nbytes, _WRITE_PIECE):
            piece = buf[start:start + _WRITE_PIECE]
            self._sha.update(piece)   # first: the write's copy then reads it from cache
            done = 0
            while done < piece.nbytes:
                done += os.write(self._fd, piece[done:])
            self._offset += done
            self._writeback.written(self._offset)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def close(self) -> str:
        """Check completeness, fsync, close; the hex sha256 of the file (again on re-close)."""
        if self._digest is not None:
            return self._digest
        if self._fd is None:
            raise ValueError(f"{self.path}: close of an aborted SafetensorsWriter")
        if self._pos != self._total:
            name = self._names[self._entry_at(self._pos)]
            self._close_fd()
            raise OutputError(f"{self.path}: closed after {self._pos} of {self._total} data "
                              f"bytes; tensor {name!r} is incomplete")
        try:
            os.fsync(self._fd)
            self._writeback.close()
        finally:
            self._close_fd()
        self._digest = self._sha.hexdigest()
        return self._digest

    def abort(self) -> None:
        """Close without checks and delete the partial file."""
        self._close_fd()
        if self._digest is None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        _close_quietly(getattr(self, "_fd", None))

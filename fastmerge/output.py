"""Where merged tensors go: an in-memory state dict, or a sharded Hugging Face checkpoint.

The checkpoint writer never leaves something that looks finished before it is: shards,
index, copied config/tokenizer files and the report are written into a hidden sibling
folder ``.NAME.partial`` and renamed to ``NAME`` only when complete. A lock file
(``.NAME.lock``, held with flock, so a killed run releases it) keeps two runs from
writing the same output. An existing output is replaced only with ``overwrite=True``
(an existing empty folder is replaced by the final rename itself); a missing parent
folder is created.

Resume: after each shard is complete its size, sha256 and the report entries of its
tensors go into ``.NAME.partial/progress.json`` (with a fingerprint of the inputs,
parameters and shard plan, and its parts, so that a refused resume says which changed).
A run without ``resume`` does not delete the completed shards of an interrupted run: it
refuses unless ``overwrite=True`` (start over). ``resume=True`` keeps a shard listed
there only when the file is still exactly the one journaled — a regular file of the
planned tensors with the recorded size and sha256, read in full (``_verified_shard``, the
only way a journaled shard is kept) — and redoes the rest, tensors included, so the
finished output is byte-identical to an uninterrupted run even when a kept shard was
truncated or changed after the interruption.

Several ranks (fastmerge.distributed, docs/spec.md §14) write one output together: each
rank writes the shards it is given and journals them in its own file (rank 0
``progress.json``, rank r ``progress.r.json``); a resume reads every journal, whoever
wrote it. Rank 0 holds the lock and alone removes, renames or finishes the folder.
"""
from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import hashlib
import json
import operator
import os
import re
import secrets
import shutil
import stat
import warnings
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch

from .errors import OutputError, ParameterError
from .io.safetensors_file import SafetensorsWriter
from .plan import TensorTask

INDEX_NAME = "model.safetensors.index.json"
PROGRESS_NAME = "progress.json"
REPORT_NAME = "fastmerge_report.json"
JOB_NAME = ".job"                 # a distributed run's token: the ranks share the folder
_JOURNAL = re.compile(r"progress(\.\d+)?\.json")
_T = TypeVar("_T")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(size) -> int:
    """'5GB' / '5G' / '500MiB' / '500Mi' / 1000000 -> bytes (> 0), case-insensitive.
    Also the shard size of fastmerge.testing's synthetic checkpoints."""
    if isinstance(size, bool):
        raise ParameterError(f"shard_size must be a size like '5GB' or a byte count, got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        num = text.rstrip("KMGTIB")
        unit = text[len(num):]
        try:
            value = int(float(num) * _UNITS[unit])
        except (KeyError, ValueError):
            raise ParameterError(
                f"shard_size must be a size like '5GB' or a byte count, got {size!r}") from None
    if value <= 0:
        raise ParameterError(f"shard_size must be positive, got {size!r}")
    return value


def plan_shards(items: Sequence[_T], shard_size: int | None,
                nbytes: Callable[[_T], int] = operator.attrgetter("nbytes")) -> list[list[_T]]:
    """Pack tensors in order into shards of at most shard_size bytes, greedily like
    ``save_pretrained``: a new shard starts when the next tensor would take the current
    one past shard_size (a bigger tensor gets a shard of its own); ``None``: one shard.
    ``nbytes(item)`` is a tensor's size (default: ``item.nbytes``, as of a TensorTask).
    The merge output and fastmerge.testing's synthetic checkpoints are both sharded so."""
    shards: list[list[_T]] = [[]]
    used = 0
    for item in items:
        size = nbytes(item)
        if shard_size is not None and shards[-1] and used + size > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return shards


def is_journal(name: str) -> bool:
    """A resume journal: rank 0's (or one process's) progress.json, rank r's progress.r.json."""
    return _JOURNAL.fullmatch(name) is not None


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class MemorySink:
    """Collects the merged tensors into a state dict (for in-memory merges)."""

    def __init__(self):
        self.state_dict: dict[str, torch.Tensor] = {}
        self._flat: torch.Tensor | None = None

    def begin(self, task: TensorTask) -> None:
        self._flat = torch.empty(task.numel, dtype=task.out_dtype)

    def write(self, task: TensorTask, start: int, data: torch.Tensor, release=None) -> None:
        self._flat[start:start + data.numel()] = data.reshape(-1)
        if release is not None:
            release(data)

    def end(self, task: TensorTask, stats: dict | None) -> None:
        self.state_dict[task.name] = self._flat.reshape(task.shape)
        self._flat = None

    def done(self, task: TensorTask) -> None:
        return None

    def mine(self, task: TensorTask) -> bool:
        return True


def format_size(nbytes: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as shard sizes are given)."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{nbytes} B"  # pragma: no cover


def _is_empty_dir(path: Path) -> bool:
    """A real (not symlinked) folder with nothing in it."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode) and not os.listdir(path)
    except OSError:
        return False


def check_output_location(output: Path, inputs: list[Path], overwrite: bool) -> Path:
    """The absolute output path, or OutputError when the output is, lies inside or
    contains an input (``inputs``: model folders or files), or exists and is not an empty
    folder (unless overwrite). A missing parent folder is fine (the writer creates it)."""
    output = Path(output).expanduser().absolute()
    real = Path(os.path.realpath(output))
    for src in inputs:
        r = Path(os.path.realpath(src))
        if real == r or r in real.parents:
            what = "the input model directory" if r.is_dir() else "the input file"
            where = "is" if real == r else "is inside"
            raise OutputError(f"output {output} {where} {what} {src}; choose a folder "
                              "outside every input")
        if real in r.parents:
            raise OutputError(f"output {output} contains the input {src}; choose a folder "
                              "that holds no input (replacing it would delete the input)")
    if os.path.lexists(output) and not overwrite and not _is_empty_dir(output):
        raise OutputError(f"output {output} already exists; pass overwrite=True "
                          "(CLI: --overwrite) to replace it")
    parent = output.parent
    if os.path.lexists(parent) and not parent.is_dir():
        raise OutputError(f"cannot write {output}: {parent} is not a folder")
    return output


class CheckpointWriter:
    """Sharded safetensors output written in a hidden folder, renamed when complete.

    Shards are written by one background thread (writes and sha256 overlap compute);
    ``write`` takes CPU tensors in strict file order. With a ``group``
    (fastmerge.distributed.Group) this writer is one rank's part: it writes the shards
    ``owned`` (set by ``open``), and rank 0's writer finishes the output.
    """

    def __init__(self, output: Path, tasks: list[TensorTask], shard_size: int,
                 overwrite: bool = False, resume: bool = False, fingerprint: str = "",
                 fingerprint_parts: dict | None = None, group=None):
        self.output = Path(output)
        self.overwrite = overwrite
        self.resume = resume
        self.fingerprint = fingerprint
        # what the fingerprint is made of (name -> value or hash), journaled so that a
        # refused resume can say what changed
        self.fingerprint_parts = fingerprint_parts
        self.partial = self.output.parent / f".{self.output.name}.partial"
        self.lock_path = self.output.parent / f".{self.output.name}.lock"
        self.shards = plan_shards(tasks, shard_size)
        self.names = [shard_name(i, len(self.shards)) for i in range(len(self.shards))]
        self.shard_of = {t.name: i for i, s in enumerate(self.shards) for t in s}
        self.sha256: dict[str, str] = {}  # completed shards: this run's, or verified ones
        self.size: dict[str, int] = {}
        self.recorded: dict[str, dict] = {}  # tensor name -> report entry, completed shards
        self.resumed = 0  # shards kept from an interrupted run (resume=True)
        self.group = group
        self.journal = PROGRESS_NAME if group is None or group.leader else \
            f"progress.{group.rank}.json"
        self.owned: set[int] | None = None   # shard indices this rank writes (None: all)
        self._writer: SafetensorsWriter | None = None
        self._current = -1
        self._lock_fd = None
        self._pool = None
        self._inflight: list[cf.Future] = []
        self._finished = False
        self.renamed = False  # the output is complete and in place (finish)

    # -- lifecycle -----------------------------------------------------------------------
    def _acquire_lock(self) -> int:
        """flock the lock file, or OutputError if another run holds it. ``_unlock`` unlinks
        the file while still holding it, so a flock won on a file that is no longer the one
        at ``lock_path`` (opened just before that run finished) guards nothing: retry."""
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"another fastmerge run is writing {self.output} "
                                  f"(lock {self.lock_path} is held)") from None
            held = os.fstat(fd)
            try:
                now = os.stat(self.lock_path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # a stale file: drop it (and its flock) and try again

    def open(self) -> "CheckpointWriter":
        if self.group is not None:
            return self._open_group()
        self._prepare()
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmerge-write")
        return self

    def _prepare(self, verify: bool = True) -> dict:
        """Lock, then make the partial folder ready: resume's journal read and (``verify``)
        its shards checked, or a left-over folder refused or removed. Returns the
        journaled {shard: entry} when resuming, else {}."""
        self._lock_fd = self._acquire_lock()
        journaled = {}
        try:
            if self.partial.exists() and self.resume:
                journaled = self._read_journals()
                if verify:
                    self._keep_verified({n: self._verified(n, e) for n, e in journaled.items()})
            elif self.partial.exists():  # left by a run that was killed: we hold the lock now
                left = self._journaled()
                if left and not self.overwrite:
                    size = format_size(sum(e.get("size", 0) for e in left.values()
                                           if isinstance(e, dict)
                                           and type(e.get("size")) is int))
                    raise OutputError(
                        f"{self.partial} holds {len(left)} completed shard"
                        f"{'s' if len(left) != 1 else ''} ({size}) of an interrupted merge "
                        f"into {self.output}; pass resume=True (CLI: --resume) to continue "
                        "from them, or overwrite=True (CLI: --overwrite) to start over")
                shutil.rmtree(self.partial)
            self.partial.mkdir(exist_ok=True)
        except BaseException as exc:  # never keep the lock of a run that did not start
            self._unlock()
            if isinstance(exc, OSError):
                raise OutputError(f"cannot prepare {self.partial} for {self.output}: "
                                  f"{exc}") from exc
            raise
        self.resumed = len(self.sha256)
        return journaled

    def _open_group(self) -> "CheckpointWriter":
        """Every rank of the group: rank 0 locks and prepares the folder; all check that
        they see it (a shared file system); on resume each verifies a share of the
        journaled shards (by bytes) and rank 0 keeps the verified ones; then the shards
        left are given out by bytes (distributed.assign)."""
        from .distributed import assign
        g = self.group

        def lead():
            journaled = self._prepare(verify=False)
            token = secrets.token_hex(16)
            (self.partial / JOB_NAME).write_text(token)
            return {"token": token, "journaled": journaled}

        try:
            found = g.broadcast(g.agree(lead if g.leader else lambda: None,
                                        f"opening the output {self.output}"))
            g.agree(lambda: self._check_shared(found["token"]),
                    f"opening the output {self.output}")
            if self.resume:
                journaled = {n: e for n, e in found["journaled"].items() if n in self.names}
                names = sorted(journaled)
                owner = assign([_entry_size(journaled[n]) for n in names], g.world)
                mine = {n: self._verified(n, journaled[n])
                        for n, r in zip(names, owner) if r == g.rank}
                verified = {}
                for part in g.gather(mine):
                    verified.update(part)
                g.agree(lambda: self._keep_verified(verified, remove=g.leader),
                        f"resuming {self.output}")
                self.resumed = len(self.sha256)
            left = [i for i, n in enumerate(self.names) if n not in self.sha256]
            owner = assign([sum(t.nbytes for t in self.shards[i]) for i in left], g.world)
            self.owned = {i for i, r in zip(left, owner) if r == g.rank}
            idle = g.world - len(set(owner))
            if idle and g.leader:
                warnings.warn(f"{idle} of {g.world} ranks have no shard to write ({len(left)} "
                              f"shards to write): the work splits by output shard; a "
                              f"smaller shard_size (CLI: --shard-size) splits it further",
                              RuntimeWarning, stacklevel=4)
        except BaseException:
            self._unlock()
            raise
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmerge-write")
        return self

    def mark_failed(self, message: str) -> None:
        """Under a group: tell the other ranks, through the shared folder, that this one
        failed (distributed.mark_failed); they stop before their next tensor."""
        if self.group is not None:
            from .distributed import mark_failed
            mark_failed(self.partial, self.group.rank, message)

    def peer_failure(self) -> tuple[int, str] | None:
        """(rank, message) of another rank's failure mark, or None (alone: always None)."""
        if self.group is None:
            return None
        from .distributed import failed_peer
        return failed_peer(self.partial, self.group.rank)

    def _check_shared(self, token: str) -> None:
        """OutputError unless this rank sees rank 0's partial folder (its token file)."""
        try:
            seen = (self.partial / JOB_NAME).read_text()
        except OSError:
            seen = None
        if seen != token:
            raise OutputError(f"{self.group.label()} on {self.group.host} does not see "
                              f"{self.partial}, which rank 0 made: every rank must write "
                              "the output on one shared file system")

    def mine(self, task: TensorTask) -> bool:
        """This rank writes ``task``'s shard."""
        return self.owned is None or self.shard_of[task.name] in self.owned

    def abort(self, keep_partial: bool = False) -> None:
        """Stop; the output location is left untouched. The hidden partial folder is
        removed, or with ``keep_partial`` kept (minus the unfinished shard) for resume."""
        if self._finished:
            return
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._writer = None  # its file goes with the partial folder
        if self.group is not None:
            # the other ranks may still be writing: drop only this rank's unfinished files
            for i in self.owned or ():
                if self.names[i] not in self.sha256:
                    (self.partial / self.names[i]).unlink(missing_ok=True)
            (self.partial / (self.journal + ".tmp")).unlink(missing_ok=True)
            self._unlock()
            return
        if keep_partial and not self.sha256:
            keep_partial = False  # no completed shard: nothing worth resuming from
        if keep_partial and self.partial.is_dir():
            for path in self.partial.iterdir():
                if not is_journal(path.name) and path.name not in self.sha256:
                    path.unlink(missing_ok=True)
            if not (self.partial / PROGRESS_NAME).exists():  # stopped inside finish()
                try:
                    self._write_progress()
                except OSError:
                    pass
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
        self._unlock()

    @property
    def completed(self) -> int:
        """Shards complete so far (kept from an interrupted run, or written by this one)."""
        return len(self.sha256)

    @property
    def completed_bytes(self) -> int:
        return sum(self.size.values())

    def _journals(self) -> list[dict]:
        """The readable journals of the partial folder (every rank's), as JSON objects."""
        docs = []
        try:
            paths = sorted(p for p in self.partial.iterdir() if is_journal(p.name))
        except OSError:
            return []
        for path in paths:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict):
                docs.append(doc)
        return docs

    def _journaled(self) -> dict:
        """{shard: entry} of every journal in the partial folder ({} when none)."""
        out = {}
        for doc in self._journals():
            shards = doc.get("shards")
            if isinstance(shards, dict):
                out.update(shards)
        return out

    def _read_journals(self) -> dict:
        """The journaled {shard: entry} to resume from; OutputError when a journal is of a
        different merge (fingerprint), naming what changed."""
        for doc in self._journals():
            if doc.get("fingerprint") != self.fingerprint:
                changed = _changed_parts(doc.get("parts"), self.fingerprint_parts)
                raise OutputError(f"cannot resume {self.output}: the interrupted run in "
                                  f"{self.partial} used {changed}; pass overwrite=True "
                                  "(CLI: --overwrite) instead of resume=True (CLI: --resume) "
                                  "to start over")
        return self._journaled()

    def _verified(self, name: str, entry) -> dict | None:
        """{"size", "sha256", "recorded"} of journaled shard ``name`` when it checks out
        (``_verified_shard``), else None."""
        if name not in self.names:
            return None
        recorded = self._verified_shard(self.names.index(name), entry)
        if recorded is None:
            return None
        return {"size": entry["size"], "sha256": entry["sha256"], "recorded": recorded}

    def _keep_verified(self, verified: dict, remove: bool = True) -> None:
        """Take the verified shards ({shard: ``_verified`` or None}) as complete; with
        ``remove`` (one process, or rank 0) delete everything else in the folder and
        leave one journal of them."""
        for name, v in verified.items():
            if v is not None:
                self.size[name], self.sha256[name] = v["size"], v["sha256"]
                self.recorded.update(v["recorded"])
        if not remove:
            return
        for path in self.partial.iterdir():
            if path.name not in self.sha256 and path.name not in (PROGRESS_NAME, JOB_NAME):
                path.unlink()
        self._write_progress()

    def _verified_shard(self, i: int, entry) -> dict[str, dict] | None:
        """The report entries {tensor: stats} of planned shard ``i`` when the journal
        ``entry`` describes its tensors, in order, and the file in the partial folder is a
        regular file of exactly the journaled size and sha256; else None (redo the shard).
        The file is read in full: a byte changed or lost after the interruption is caught."""
        if not isinstance(entry, dict):
            return None
        size, digest, tensors = entry.get("size"), entry.get("sha256"), entry.get("tensors")
        if type(size) is not int or not isinstance(digest, str) or len(digest) != 64 \
                or not isinstance(tensors, list) or len(tensors) != len(self.shards[i]):
            return None
        recorded = {}
        for task, t in zip(self.shards[i], tensors):
            if not isinstance(t, dict) or t.get("name") != task.name \
                    or not isinstance(t.get("stats"), dict):
                return None
            recorded[task.name] = t["stats"]
        if _file_digest(self.partial / self.names[i], size) != (size, digest):
            return None
        return recorded

    def _write_progress(self) -> None:
        shards = {}
        for i, name in enumerate(self.names):
            if name in self.sha256:
                shards[name] = {"size": self.size[name], "sha256": self.sha256[name],
                                "tensors": [
                    {"name": t.name, "stats": self.recorded.get(t.name, {})}
                    for t in self.shards[i]]}
        tmp = self.partial / (self.journal + ".tmp")
        doc = {"fingerprint": self.fingerprint}
        if self.fingerprint_parts is not None:
            doc["parts"] = self.fingerprint_parts
        doc["shards"] = shards
        _write_json(tmp, doc)
        os.replace(tmp, self.partial / self.journal)

    def done(self, task: TensorTask) -> dict | None:
        """The recorded report entry of a tensor in a verified completed shard, else None."""
        if self.names[self.shard_of[task.name]] in self.sha256:
            return self.recorded.get(task.name, {})
        return None

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- sink protocol -------------------------------------------------------------------
    def begin(self, task: TensorTask) -> None:
        i = self.shard_of[task.name]
        if i != self._current:
            self._submit(self._open_shard, i)
            self._current = i

    def write(self, task: TensorTask, start: int, data: torch.Tensor, release=None) -> None:
        self._submit(self._write, data, release)

    def end(self, task: TensorTask, stats: dict | None) -> None:
        self.recorded[task.name] = stats or {}
        shard = self.shards[self._current]
        if task.name == shard[-1].name:
            self._submit(self._close_shard, self._current)

    def _submit(self, fn, *args) -> None:
        self._inflight.append(self._pool.submit(fn, *args))
        while len(self._inflight) > 2 or (self._inflight and self._inflight[0].done()):
            self._inflight.pop(0).result()  # re-raises a write error here

    def _drain(self) -> None:
        while self._inflight:
            self._inflight.pop(0).result()

    # -- run on the writer thread --------------------------------------------------------
    def _open_shard(self, i: int) -> None:
        entries = [(t.name, t.out_dtype, t.shape) for t in self.shards[i]]
        self._writer = SafetensorsWriter(self.partial / self.names[i], entries,
                                         metadata={"format": "pt"})

    def _write(self, data: torch.Tensor, release=None) -> None:
        self._writer.write(data)
        if release is not None:
            release(data)

    def _close_shard(self, i: int) -> None:
        name = self.names[i]
        self.sha256[name] = self._writer.close()
        self.size[name] = self._writer.size
        self._writer = None
        self._write_progress()

    # -- completion ----------------------------------------------------------------------
    def close_part(self) -> dict:
        """Wait for this rank's writes; its completed shards and their report entries,
        {"size", "sha256", "recorded"}, for rank 0 (``absorb``)."""
        self._drain()
        self._pool.shutdown(wait=True)
        self._pool = None
        return {"size": dict(self.size), "sha256": dict(self.sha256),
                "recorded": dict(self.recorded)}

    def absorb(self, part: dict) -> None:
        """Take another rank's ``close_part``."""
        self.size.update(part["size"])
        self.sha256.update(part["sha256"])
        self.recorded.update(part["recorded"])

    def finish(self, report: dict, copy_files: list[Path]) -> Path:
        """Write index, copied files and report; then make the output appear atomically."""
        if self._pool is not None:
            self.close_part()
        if len(self.sha256) != len(self.names):
            raise OutputError(f"internal error: {len(self.sha256)} of {len(self.names)} "
                              "shards were completed")
        weight_map = {t.name: self.names[i] for i, s in enumerate(self.shards) for t in s}
        total = sum(t.nbytes for s in self.shards for t in s)
        _write_json(self.partial / INDEX_NAME,
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
        for src in copy_files:
            shutil.copyfile(src, self.partial / src.name)
        report["shards"] = {n: self.sha256[n] for n in self.names}
        _write_json(self.partial / REPORT_NAME, report)
        for path in list(self.partial.iterdir()):
            if is_journal(path.name) or path.name == JOB_NAME:
                path.unlink()
        _fsync_dir(self.partial)
        old = None
        # an empty folder is replaced by the rename itself (atomically, by rename(2))
        if os.path.lexists(self.output) and not _is_empty_dir(self.output):
            if not self.overwrite:
                self._appeared()
            old = self.output.parent / f".{self.output.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.output, old)
        try:
            os.rename(self.partial, self.output)
        except OSError as exc:
            if old is None and exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR,
                                             errno.EISDIR):
                self._appeared()  # something was put into the empty folder meanwhile
            raise
        self.renamed = True
        _fsync_dir(self.output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._unlock()
        return self.output


    def _appeared(self):
        self._unlock()
        self._finished = True  # abort() must keep the result it points to
        raise OutputError(f"output {self.output} appeared during the merge; "
                          f"the result is left in {self.partial}")


def _entry_size(entry) -> int:
    """A journal entry's shard size (0 when it has none: verification refuses it)."""
    size = entry.get("size") if isinstance(entry, dict) else None
    return size if type(size) is int else 0


def _changed_parts(old, new) -> str:
    """What differs between two journaled fingerprint parts, for the resume refusal:
    "a different shard plan", "a different backend ('c' then, 'torch' now)", ..."""
    generic = "different inputs, parameters or shard plan"
    if not isinstance(old, dict) or not isinstance(new, dict):
        return generic
    changed = []
    for key in [*new, *(k for k in old if k not in new)]:
        before, value = old.get(key), new.get(key)
        if before == value:
            continue
        what = f"different {key}" if key.endswith("s") else f"a different {key}"
        if key == "inputs" and isinstance(before, dict) and isinstance(value, dict):
            if list(before) != list(value):
                what += f" ({', '.join(before)} then; {', '.join(value)} now)"
            else:
                what += f" ({', '.join(k for k in value if before[k] != value[k])} changed)"
        elif isinstance(value, str) and len(value) != 64:  # a plain value, not a hash
            what += f" ({before!r} then, {value!r} now)"
        changed.append(what)
    return ", ".join(changed) if changed else generic


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, allow_nan=False)   # strict JSON
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _sha256_file(path: Path) -> str | None:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None


def _file_digest(path: Path, expect_size: int) -> tuple[int, str] | None:
    """(bytes read, hex sha256) of the regular file at path (a symlink is not followed,
    a FIFO not waited on), or None when it cannot be read, is no regular file or is not
    ``expect_size`` bytes long (then it is not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != expect_size:
            return None
        h, n = hashlib.sha256(), 0
        with open(fd, "rb", closefd=False) as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                n += len(chunk)
        return n, h.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

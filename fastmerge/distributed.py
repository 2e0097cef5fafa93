"""One merge on many processes with torch.distributed (docs/spec.md §14).

Under ``torchrun`` (or any initialised process group) a merge to disk is split by output
shard: the shard plan is the single-process one, every shard is given to one rank
(``assign``: by bytes, largest first, to the least-loaded rank), and each rank reads only
the tensors of its shards and writes those files into the shared ``.NAME.partial``
folder. Rank 0 holds the output lock, writes the index, the report and the config files
and makes the output appear, after every rank has finished. The only numbers that cross
ranks are ``scope="model"``'s radix-select histograms (exact int64 sums, so every rank
finds the single-process thresholds) and small Python objects (journals, report
entries, errors): the output is byte for byte the single-process one.

Collectives run on a gloo group (CPU tensors and objects): the default group when its
backend includes gloo, else (an NCCL-only group) a gloo group made over the same ranks.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from .errors import OutputError, ParameterError

# A rank that finishes early waits for the others at the end of the merge: the group's
# timeout must outlast the imbalance (one shard at most) and any slow file system.
GROUP_TIMEOUT = timedelta(hours=6)


class RankFailed(OutputError):
    """Another rank of this job failed (or stopped): the merge did not complete."""


class PeerStopped(RankFailed):
    """This rank stopped before its next tensor because another rank had failed."""


FAILED_PREFIX = ".failed.r"          # + rank: a failed rank's mark in the shared folder


def mark_failed(folder, rank: int, message: str) -> None:
    """Leave ``folder/.failed.r<rank>`` holding ``message``, so that the other ranks stop
    before their next tensor instead of at the end (best effort: the final gather tells
    them in any case)."""
    try:
        (folder / f"{FAILED_PREFIX}{rank}").write_text(message)
    except OSError:
        pass


def failed_peer(folder, rank: int) -> tuple[int, str] | None:
    """(rank, message) of another rank's failure mark in ``folder``, or None."""
    try:
        with os.scandir(folder) as entries:
            marks = sorted(e.name for e in entries if e.name.startswith(FAILED_PREFIX))
    except OSError:
        return None
    for name in marks:
        r = name[len(FAILED_PREFIX):]
        if r.isdigit() and int(r) != rank:
            try:
                return int(r), (folder / name).read_text()
            except OSError:
                return int(r), "(its message could not be read)"
    return None


def assign(sizes, world: int) -> list[int]:
    """The rank of each item: items by decreasing size (ties: lower index first), each
    to the rank with the fewest bytes so far (ties: lower rank). Deterministic, so every
    rank computes the same plan without talking."""
    loads = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += sizes[i]
    return owner


@dataclass
class Group:
    """The ranks of one merge: this process's ``rank`` of ``world``, the gloo group the
    collectives run on (None: the default group), the host and local rank for messages."""

    rank: int
    world: int
    pg: object = None
    local_rank: int = 0
    host: str = field(default_factory=socket.gethostname)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def label(self, rank: int | None = None) -> str:
        return f"rank {self.rank if rank is None else rank} of {self.world}"

    # -- collectives (every rank calls them in the same order) ---------------------------
    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        import torch.distributed as dist
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.pg)
        except RuntimeError as exc:          # a peer died or the group timed out
            raise RankFailed(f"{self.label()}: another rank of this job stopped "
                             f"(torch.distributed: {_first_line(exc)})") from exc
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return self.gather(obj if self.leader else None)[0]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The int64 sum of ``t`` over ranks (exact), on every rank."""
        import torch.distributed as dist
        t = t.to(torch.int64).cpu().contiguous()
        try:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.pg)
        except RuntimeError as exc:
            raise RankFailed(f"{self.label()}: another rank of this job stopped "
                             f"(torch.distributed: {_first_line(exc)})") from exc
        return t

    def agree(self, fn, what: str):
        """Run ``fn()`` on every rank; if it raised on any, raise on every rank (this
        rank's own exception where it failed, else a RankFailed naming the first failed
        rank and its message). Returns ``fn()``'s result."""
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:       # any failure: told to the others, who must not hang
            error = exc
        told = self.gather(None if error is None else str(error))
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(told) if m is not None]
        if failed:
            r, message = failed[0]
            raise RankFailed(f"{what} failed on {self.label(r)}: {message}")
        return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def current(setting=None) -> Group | None:
    """The group a merge runs on. ``setting``: None (default: the initialised default
    process group, when it has more than one rank), True (the same, but the group must
    exist), False (no splitting: this process merges alone) or a ``torch.distributed``
    ProcessGroup."""
    if setting is False:
        return None
    try:
        import torch.distributed as dist
    except ImportError:                                 # pragma: no cover
        dist = None
    if dist is None or not dist.is_available():
        if setting not in (None, False):
            raise ParameterError("distributed= needs torch.distributed, which this PyTorch "
                                 "lacks")
        return None
    if setting is None or setting is True:
        if not dist.is_initialized():
            if setting is True:
                raise ParameterError("distributed=True needs an initialised process group "
                                     "(torch.distributed.init_process_group, or torchrun with "
                                     "the CLI)")
            return None
        pg = None
    else:
        pg = setting
    world = dist.get_world_size(pg)
    if world <= 1:
        return None
    rank = dist.get_rank(pg)
    if "gloo" not in str(dist.get_backend(pg)):        # NCCL only: objects need gloo
        ranks = None if pg is None else dist.get_process_group_ranks(pg)
        pg = dist.new_group(ranks=ranks, backend="gloo", timeout=GROUP_TIMEOUT)
    return Group(rank, world, pg, int(os.environ.get("LOCAL_RANK", rank)))


def launched() -> bool:
    """This process was started by torchrun (or a launcher setting its variables) as one
    of several ranks."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init_from_env(device: str = "auto") -> bool:
    """Initialise the default process group from torchrun's variables (env://) when this
    process is one of several ranks and no group exists; True when it did. gloo for the
    CPU, and NCCL beside it when the merge runs on CUDA (each rank on GPU LOCAL_RANK)."""
    if not launched():
        return False
    import torch.distributed as dist
    if dist.is_initialized():
        return False
    cuda = device != "cpu" and not str(device).startswith("cpu") and torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        raise ParameterError(f"torch.distributed could not start (RANK "
                             f"{os.environ.get('RANK')}, WORLD_SIZE "
                             f"{os.environ.get('WORLD_SIZE')}, MASTER_ADDR "
                             f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                             f"{_first_line(exc)}") from exc
    return True


def finalize() -> None:
    """Tear down a process group ``init_from_env`` made (gloo aborts the process at exit
    otherwise)."""
    import torch.distributed as dist
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:     # a peer already gone: nothing left to tear down cleanly
            pass


def rank_device(device, group: Group | None):
    """On CUDA each rank takes GPU LOCAL_RANK: 'auto' and 'cuda' mean 'cuda:LOCAL_RANK'
    under a group (an explicit 'cuda:i' is kept)."""
    if group is None or device not in (None, "auto", "cuda"):
        return device
    if device == "cuda" or torch.cuda.is_available():
        return f"cuda:{group.local_rank}"
    return device


@dataclass
class Work:
    """What one rank did: shards and bytes written, seconds from its start of work."""

    rank: int
    host: str
    shards: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict:
        return {"rank": self.rank, "host": self.host, "shards": self.shards,
                "bytes_written": self.bytes_written, "seconds": round(self.seconds, 3)}

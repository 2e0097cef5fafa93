"""One rank of a distributed test merge (tests/test_distributed.py); not a test module.

    python tests/distributed_worker.py api JOB.json          (RANK, WORLD_SIZE, MASTER_ADDR,
                                                              MASTER_PORT set by the test)
    torchrun ... tests/distributed_worker.py cli [--die-after-shards K] -- merge CFG OUT ...

``api``: initialise gloo from the environment, run every merge of JOB.json
({"merges": [{"name", "kwargs"}], "results": DIR}) through ``fastmerge.merge()`` and write
this rank's outcomes (error text or the ranks' work) to DIR/rank<R>.json.
With ``"hold_rank": R`` in JOB.json, rank R starts its tensors only once another rank has
marked a failure in the shared folder (the order the early-stop test needs).
``cli``: run ``fastmerge.cli.main`` on the arguments after ``--``; with
``--die-after-shards K`` rank 1 kills itself (SIGKILL) right after journaling its K-th
shard, the fault the tests inject.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_api(job_file: str) -> int:
    import torch.distributed as dist

    import fastmerge
    job = json.loads(Path(job_file).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if job.get("hold_rank") == rank:
        hold_until_a_peer_fails(rank)
    out = []
    try:
        for m in job["merges"]:
            try:
                res = fastmerge.merge(**m["kwargs"])
                out.append({"name": m["name"], "error": None, "ranks": res.ranks,
                            "resumed": res.shards_resumed})
            except Exception as exc:          # recorded: the test checks every rank's
                out.append({"name": m["name"], "error": f"{type(exc).__name__}: {exc}"})
    finally:
        Path(job["results"], f"rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()
    return 0


def hold_until_a_peer_fails(rank: int) -> None:
    import time

    from fastmerge.distributed import failed_peer
    from fastmerge.pipeline import StreamMerge
    run = StreamMerge.run

    def held(self):
        deadline = time.monotonic() + 120
        while failed_peer(self.sink.partial, rank) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return run(self)
    StreamMerge.run = held


def run_cli(argv: list[str]) -> int:
    from fastmerge import cli
    from fastmerge.output import CheckpointWriter
    die_after = None
    if argv[:1] == ["--die-after-shards"]:
        die_after, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if die_after is not None and os.environ.get("RANK") == "1":
        close = CheckpointWriter._close_shard
        done = []

        def close_then_die(self, i):
            close(self, i)
            done.append(i)
            if len(done) >= die_after:
                os.kill(os.getpid(), signal.SIGKILL)
        CheckpointWriter._close_shard = close_then_die
    return cli.main(argv)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    sys.exit(run_api(rest[0]) if mode == "api" else run_cli(rest))

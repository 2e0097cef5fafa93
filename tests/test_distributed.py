"""One merge on several processes (torch.distributed, gloo on the CPU; docs/spec.md §14).

Ranks are real processes: started by the test with torchrun's variables (the API), or by
torchrun itself (the CLI, a killed rank, two simulated nodes). Every output is compared
byte for byte, file by file, with a single-process merge of the same arguments.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import fastmerge
import fastmerge.cli
from fastmerge.distributed import assign
from fastmerge.methods import METHODS
from fastmerge.testing import PRESETS, write_extended_vocab_family, write_llama_family

WORKER = Path(__file__).with_name("distributed_worker.py")
SHARD = "40KB"           # the tiny preset's output in 8 shards: work for every rank
TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def assert_same_output(got: Path, want: Path) -> None:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs from the single-process output"


def env_for(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


def run_ranks(tmp: Path, world: int, merges: list[dict], hold_rank: int | None = None,
              tag: str = "") -> list[list[dict]]:
    """Run ``merges`` ({"name", "kwargs"}) on ``world`` ranks; every rank's outcomes.
    ``hold_rank``: that rank starts its tensors only after another marked a failure."""
    results = tmp / f"results-{world}{tag}"
    results.mkdir()
    job = tmp / f"job-{world}{tag}.json"
    job.write_text(json.dumps({"merges": merges, "results": str(results),
                               "hold_rank": hold_rank}))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "api", str(job)],
                              env=env_for(r, world, port), stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    paths = write_llama_family(root / "in", config=PRESETS["tiny"], n_models=2,
                               names=("base", "ct", "sft"), shard_size="60KB")
    vocab = write_extended_vocab_family(root / "vocab", "tiny", new_tokens=64)
    return {"root": root, "base": str(paths["base"]),
            "models": [str(m) for m in paths["models"]],
            "vocab": {"base": str(vocab["base"]), "models": [str(vocab["ct"]),
                                                             str(vocab["sft"])]}}


def method_cases() -> list[tuple[str, dict]]:
    """Every method, with scope "model" too where it selects thresholds."""
    cases = []
    for name, spec in METHODS.items():
        kw = {"method": name}
        if spec.thresholds or name.startswith(("dare", "della")):
            kw["density"] = 0.4
        if spec.protects:
            kw["slack"] = [0.0, 0.05]
        if name.startswith("della"):
            kw["epsilon"] = 0.1
        cases.append((name, kw))
        if spec.thresholds or spec.protects:
            cases.append((f"{name}-model", {**kw, "scope": "model"}))
    return cases


@pytest.mark.parametrize("world", [2, 3])
def test_every_method_and_scope_is_byte_identical_to_one_process(family, tmp_path, world):
    merges, want = [], {}
    for name, kw in method_cases():
        models = family["models"][:METHODS[kw["method"]].models[1] or 2]
        common = dict(base=family["base"], models=models, shard_size=SHARD, backend="c",
                      progress=False, **kw)
        want[name] = fastmerge.merge(**common, output=tmp_path / "one" / name,
                                     distributed=False)
        merges.append({"name": name,
                       "kwargs": {**common, "output": str(tmp_path / "many" / name)}})
    for scope in ("tensor", "model"):      # a CT model with an extended vocabulary (§13)
        name = f"vocab-union-{scope}"
        common = dict(**family["vocab"], method="ties_sv", density=0.4, slack=[0.0, 0.05],
                      scope=scope, tokenizer_source="union", config_from=1,
                      shard_size=SHARD, backend="c", progress=False)
        want[name] = fastmerge.merge(**common, output=tmp_path / "one" / name,
                                     distributed=False)
        merges.append({"name": name,
                       "kwargs": {**common, "output": str(tmp_path / "many" / name)}})
    outcomes = run_ranks(tmp_path, world, merges)
    for r, got in enumerate(outcomes):
        assert [o["name"] for o in got] == [m["name"] for m in merges]
        for o in got:
            assert o["error"] is None, f"rank {r}, {o['name']}: {o['error']}"
    for m in merges:
        name = m["name"]
        assert_same_output(tmp_path / "many" / name, tmp_path / "one" / name)
        work = outcomes[0][[o["name"] for o in outcomes[0]].index(name)]["ranks"]
        assert [w["rank"] for w in work] == list(range(world))
        assert sum(w["shards"] for w in work) == want[name].shards_total
        assert all(w["shards"] > 0 for w in work)    # 8 shards: every rank writes some
        assert not (tmp_path / "many" / f".{name}.partial").exists()
        assert not (tmp_path / "many" / f".{name}.lock").exists()


def test_a_failure_on_one_rank_is_an_error_on_every_rank(family, tmp_path):
    """A non-finite entry in a tensor of rank 1's shards: rank 1 names the tensor, rank
    0 names rank 1 and its message; nothing looks finished, the shards done are kept."""
    import torch
    from fastmerge.io.checkpoint import Checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(family["models"][1], bad)
    out = tmp_path / "out"
    kw = dict(base=family["base"], models=[family["models"][0], str(bad)], method="ties",
              density=0.4, shard_size=SHARD, backend="c", progress=False)
    ck = Checkpoint.open(str(bad))
    name = ck.names[-1]
    info = ck.info(name)
    ck.close()
    shard = next(bad.glob("*.safetensors")) if len(list(bad.glob("*.safetensors"))) == 1 \
        else bad / json.loads((bad / "model.safetensors.index.json").read_text())[
            "weight_map"][name]
    data = bytearray(shard.read_bytes())
    nan = torch.tensor([float("nan")], dtype=info.dtype).view(torch.uint8).numpy().tobytes()
    data[info.offset:info.offset + len(nan)] = nan
    shard.write_bytes(bytes(data))
    got = run_ranks(tmp_path, 2, [{"name": "bad", "kwargs": {**kw, "output": str(out)}}])
    errors = [g[0]["error"] for g in got]
    owner = [r for r, e in enumerate(errors) if not e.startswith("RankFailed")]
    assert len(owner) == 1, errors          # the rank that merges the tensor...
    assert errors[owner[0]].startswith("InputError") and "non-finite" in errors[owner[0]]
    assert name in errors[owner[0]]
    other = errors[1 - owner[0]]            # ...and the other, naming it and its message
    assert f"failed on rank {owner[0]} of 2" in other and name in other, other
    assert not out.exists()
    assert (tmp_path / ".out.partial").is_dir()
    assert not (tmp_path / ".out.lock").exists()

    # The failed rank marks its failure at once: the other stops before its next tensor
    # (held here until the mark exists, so it has written nothing), not after its shards.
    out2 = tmp_path / "out2"
    held = 1 - owner[0]
    got = run_ranks(tmp_path, 2, [{"name": "bad", "kwargs": {**kw, "output": str(out2)}}],
                    hold_rank=held, tag="-held")
    errors = [g[0]["error"] for g in got]
    assert errors[owner[0]].startswith("InputError") and name in errors[owner[0]], errors
    assert errors[held].startswith("RankFailed"), errors
    assert f"failed on rank {owner[0]} of 2" in errors[held] and name in errors[held]
    assert "this rank stopped early" in errors[held], errors[held]
    partial = tmp_path / ".out2.partial"
    journal = partial / ("progress.json" if held == 0 else f"progress.{held}.json")
    assert not journal.exists() or not json.loads(journal.read_text()).get("shards"), \
        journal.read_text()
    assert not out2.exists() and not (tmp_path / ".out2.lock").exists()
    assert (partial / f".failed.r{owner[0]}").read_text() in errors[owner[0]]


def test_a_second_job_is_refused_on_every_rank(family, tmp_path):
    """The output lock is rank 0's for the whole job; a job finding it held stops on
    every rank, naming the lock."""
    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        kw = dict(base=family["base"], models=family["models"], method="ties", density=0.4,
                  shard_size=SHARD, backend="c", progress=False, output=str(out))
        got = run_ranks(tmp_path, 2, [{"name": "second", "kwargs": kw}])
    finally:
        os.close(fd)
    e0, e1 = got[0][0]["error"], got[1][0]["error"]
    assert e0.startswith("OutputError") and "lock" in e0 and "is held" in e0, e0
    assert e1.startswith("RankFailed") and "rank 0 of 2" in e1 and "is held" in e1, e1
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def torchrun(*args, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def write_config(family, path: Path, method="ties_sv") -> Path:
    path.write_text(f"""merge_method: {method}
base_model: {family['base']}
models:
  - model: {family['models'][0]}
    parameters: {{weight: 1.0, density: 0.4, slack: 0.0}}
  - model: {family['models'][1]}
    parameters: {{weight: 1.0, density: 0.4, slack: 0.05}}
parameters: {{scope: model}}
""")
    return path


@pytest.fixture(scope="module")
def cli_reference(family):
    cfg = write_config(family, family["root"] / "cfg.yml")
    ref = family["root"] / "reference"
    fastmerge.cli.main(["merge", cfg, ref, "--shard-size", SHARD, "--no-progress",
                        "--backend", "c"])
    return cfg, ref


def test_torchrun_cli_kill_a_rank_then_resume(family, cli_reference, tmp_path):
    """torchrun, 2 ranks: rank 1 is SIGKILLed after its first shard. The job fails on
    every rank, no output appears, the completed shards stay; --resume on 3 ranks (and
    on one process, from the same left-overs) gives the single-process bytes."""
    import fastmerge.cli  # noqa: F401
    cfg, ref = cli_reference
    out = tmp_path / "out"
    merge = ["merge", cfg, out, "--shard-size", SHARD, "--no-progress", "--backend", "c"]
    proc = torchrun("--nproc-per-node", 2, "--master-port", free_port(), WORKER, "cli",
                    "--die-after-shards", 1, "--", *merge)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0
    assert not out.exists()
    partial = tmp_path / ".out.partial"
    journals = sorted(p.name for p in partial.iterdir() if p.name.startswith("progress"))
    assert "progress.1.json" in journals, (journals, stderr[-3000:])
    assert "rank 0 of 2" in stderr, stderr[-3000:]           # the survivor said why
    assert not (tmp_path / ".out.lock").exists()
    saved = tmp_path / "saved"
    shutil.copytree(partial, saved)

    proc = torchrun("--nproc-per-node", 3, "--master-port", free_port(), WORKER, "cli",
                    "--", *merge, "--resume")
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr[-3000:]
    kept = int(stdout.split("resumed ")[1].split(" of ")[0])
    assert kept >= 1, stdout
    assert "on 3 ranks" in stdout
    assert_same_output(out, ref)

    one = tmp_path / "one" / "out"
    one.parent.mkdir()
    shutil.copytree(saved, tmp_path / "one" / ".out.partial")
    rc = fastmerge.cli.main(["merge", cfg, one, "--shard-size", SHARD, "--no-progress",
                             "--backend", "c", "--resume"])
    assert rc == 0
    assert_same_output(one, ref)


def test_two_nodes_on_one_machine(family, cli_reference, tmp_path):
    """--nnodes 2: two torchrun launches (one rank each) meet at 127.0.0.1."""
    cfg, ref = cli_reference
    out = tmp_path / "out"
    port = free_port()
    launches = [torchrun("--nnodes", 2, "--node-rank", node, "--nproc-per-node", 1,
                         "--master-addr", "127.0.0.1", "--master-port", port,
                         "-m", "fastmerge", "merge", cfg, out, "--shard-size", SHARD,
                         "--no-progress", "--backend", "c") for node in (0, 1)]
    outs = [p.communicate(timeout=TIMEOUT) for p in launches]
    for p, (so, se) in zip(launches, outs):
        assert p.returncode == 0, se[-3000:]
    assert "on 2 ranks" in outs[0][0]
    assert_same_output(out, ref)


def test_assign_balances_bytes_not_count():
    # one big shard and four small ones: the big one alone on a rank
    assert assign([100, 10, 10, 10, 10], 2) == [0, 1, 1, 1, 1]
    assert assign([5, 5, 5], 3) == [0, 1, 2]
    assert assign([], 4) == []
    sizes = [7, 3, 9, 1, 4, 4, 8]
    owner = assign(sizes, 3)
    loads = [sum(s for s, r in zip(sizes, owner) if r == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(sizes)
    assert owner == assign(sizes, 3)          # deterministic


def test_each_rank_takes_its_local_gpu(monkeypatch):
    import torch
    from fastmerge.distributed import Group, rank_device
    g = Group(rank=5, world=8, local_rank=1, host="node1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("auto", g) == "cuda:1"
    assert rank_device("cuda", g) == "cuda:1"
    assert rank_device("cuda:3", g) == "cuda:3"      # asked for by name: kept
    assert rank_device("cpu", g) == "cpu"
    assert rank_device("auto", None) == "auto"        # one process: unchanged
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", g) == "auto"           # no GPU: the CPU, as one process

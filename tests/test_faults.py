"""Faults: a merge killed at any moment (SIGKILL) or failing (disk full, I/O error) leaves
no directory that looks like a finished checkpoint and never touches its inputs; a lock
keeps two runs from writing the same output; ``--resume`` continues from the verified
completed shards and gives a byte-identical output; ``fastmerge verify`` checks a
finished output against its own report.

The kill loop runs the real CLI in a subprocess and SIGKILLs it at seeded random moments
(by time, and when the progress journal reaches a random shard count, and during the
final renames); the I/O faults are injected with real errnos (a short write then
ENOSPC, the kernel's own ENOSPC from /dev/full, EIO from fsync, ENOSPC while writing the
journal or the report) into in-process merges of a tiny family.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge import cli
from fastmerge import output as output_mod
from fastmerge.config import load_config
from fastmerge.errors import InputError, OutputError
from fastmerge.io import safetensors_file
from fastmerge.io.safetensors_file import SafetensorsFile
from fastmerge.output import INDEX_NAME, PROGRESS_NAME, REPORT_NAME
from fastmerge.plan import TensorTask
from fastmerge.testing import PRESETS, write_llama_family
from fastmerge.verify import verify_output

# Kill loop: the "small" preset (27.4M parameters, 55 MB per fp16 model), 18 shards of
# <= 4 MB; one CLI run takes ~2 s on 2 cores, ~1.2 s of it interpreter start-up.
KILL_CONFIG = PRESETS["small"]
KILL_SHARD = "4MB"
KILL_ITERATIONS = 8        # random kills (plus at most 3 targeted ones, see below)
KILL_LOOP_BUDGET_S = 40.0  # no new random kill starts after this
KILL_SEED = 20240607

# In-process faults: the tiny preset (124k parameters), 7 output shards.
TINY_KW = dict(method="ties_sv", density=0.3, slack=[0.0, 0.05], shard_size=40_000,
               progress=False)

CONFIG_YAML = """\
merge_method: ties_sv
base_model: {base}
models:
  - model: {ct}
    parameters: {{weight: 1.0, density: 0.3}}
  - model: {sft}
    parameters: {{weight: 1.0, density: 0.3, slack: 0.05}}
parameters: {{normalize: true, lambda: 1.0, elect: sum, scope: tensor}}
"""


# -- helpers -----------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) -> sha256; folders -> 'dir'."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = sha256(Path(p))
    return out


def assert_same_output(got: Path, want: Path) -> None:
    """Byte-identical folders: the same file names, every file the same bytes."""
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name


def shard_names(out: Path) -> list[str]:
    index = json.loads((out / INDEX_NAME).read_text())
    return sorted(set(index["weight_map"].values()))


def journal(partial: Path) -> dict[str, str]:
    """{shard: sha256} that progress.json claims complete ({} when there is none)."""
    try:
        doc = json.loads((partial / PROGRESS_NAME).read_text())
    except FileNotFoundError:
        return {}
    return {name: e["sha256"] for name, e in doc["shards"].items()}


def check_partial(partial: Path, ref: Path) -> dict[str, str]:
    """What an interrupted run left is honest: every shard the journal names is there,
    with the sha256 it records, byte-identical to the uninterrupted run's shard."""
    listed = journal(partial)
    for name, digest in listed.items():
        assert (partial / name).is_file(), f"journal lists {name} but it is missing"
        assert sha256(partial / name) == digest, f"journal sha256 of {name} is wrong"
        assert (partial / name).read_bytes() == (ref / name).read_bytes(), name
    return listed


def file_ids(folder: Path, names) -> dict[str, tuple]:
    return {n: ((folder / n).stat().st_ino, (folder / n).stat().st_mtime_ns) for n in names}


def merge_cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastmerge", "merge", str(cfg), str(out),
            "--shard-size", KILL_SHARD, "--no-progress", *extra]


class OsProxy:
    """Stands in for the ``os`` module inside fastmerge.io.safetensors_file only, with some
    functions replaced (everything else is the real os)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- fixtures ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kill_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_kill")
    paths = write_llama_family(root / "inputs", config=KILL_CONFIG, n_models=2, seed=11,
                               names=("base", "ct", "sft"))
    cfg = root / "merge.yml"
    cfg.write_text(CONFIG_YAML.format(base=paths["base"], ct=paths["models"][0],
                                      sft=paths["models"][1]))
    return {"root": root, "inputs": root / "inputs", "cfg": cfg, **paths}


@pytest.fixture(scope="module")
def kill_reference(kill_family):
    """The uninterrupted CLI run, and how long it took (start-up included)."""
    out = kill_family["root"] / "reference"
    t0 = time.monotonic()
    proc = subprocess.run(merge_cmd(kill_family["cfg"], out), capture_output=True, text=True,
                          timeout=300)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    verify_output(out)
    assert len(shard_names(out)) >= 8
    return out, wall


@pytest.fixture(scope="module")
def tiny_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_tiny")
    paths = write_llama_family(root / "inputs", config=PRESETS["tiny"], n_models=2, seed=5,
                               shard_size=60_000, names=("base", "ct", "sft"))
    return {"root": root, "inputs": root / "inputs", **paths}


@pytest.fixture(scope="module")
def tiny_reference(tiny_family):
    result = fastmerge.merge(tiny_family["base"], tiny_family["models"],
                             output=tiny_family["root"] / "reference", **TINY_KW)
    assert len(shard_names(result.path)) >= 5
    return result.path


def tiny_merge(family, out, **kw):
    return fastmerge.merge(family["base"], family["models"], output=out, **{**TINY_KW, **kw})


# -- 1. SIGKILL at any moment ------------------------------------------------------------

def written_since(path: Path, ns: int) -> bool:
    """path exists and was written by this run (not left by a killed one)."""
    try:
        return path.stat().st_mtime_ns >= ns
    except FileNotFoundError:
        return False


def _kill_once(cmd, out, partial, rng, mode, start_listed, n, t_ref, log_file):
    """Run the CLI; SIGKILL it when ``mode`` says. Returns (returncode, seconds, trigger)."""
    if mode == "time":
        delay = rng.uniform(0.05, 1.05) * t_ref  # anywhere in a run, start-up included
        target = None
    elif mode == "shards":
        target = min(n - 1, start_listed + rng.randint(1, max(1, (n - 1 - start_listed))))
        if target <= start_listed:
            target = n
        delay = rng.uniform(0.0, 0.02)
    else:  # "finish": after the last shard, while index, report and rename happen (~4 ms)
        target, delay = n, rng.uniform(0.0, 0.004)
    started_ns = time.time_ns()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file)
    trigger = "exit"
    try:
        limit = max(30.0, 6 * t_ref)
        while proc.poll() is None:
            elapsed = time.monotonic() - t0
            if elapsed > limit:
                trigger = "watchdog"
                break
            if target is None:
                if elapsed >= delay:
                    trigger = f"t={delay:.2f}s"
                    break
            else:
                if out.exists() or written_since(partial / INDEX_NAME, started_ns) or \
                        (written_since(partial / PROGRESS_NAME, started_ns)
                         and len(journal(partial)) >= target):
                    time.sleep(delay)
                    trigger = f"{target} shards+{delay * 1000:.1f}ms"
                    break
            time.sleep(0.0005 if mode == "finish" else 0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, time.monotonic() - t0, trigger


def test_sigkill_at_any_moment_then_resume_is_byte_identical(kill_family, kill_reference):
    ref, t_ref = kill_reference
    n = len(shard_names(ref))
    work = kill_family["root"] / "kill"
    work.mkdir()
    out, partial = work / "out", work / ".out.partial"
    inputs_before = tree_digest(kill_family["inputs"])
    rng = random.Random(KILL_SEED)
    log_path = kill_family["root"] / "kill.log"
    modes = ["time", "shards", "time", "finish", "time", "shards", "finish", "shards"]
    history = []

    def check_invariants(what: str) -> int:
        """After a kill: nothing half-done is visible; a finished OUT is the real thing."""
        names = set(os.listdir(work))
        visible = {x for x in names if not x.startswith(".")}
        assert visible <= {"out"}, f"{what}: unexpected {visible}"
        assert names - visible <= {".out.partial", ".out.lock"}, f"{what}: {names}"
        listed = check_partial(partial, ref) if partial.is_dir() else {}
        if out.exists():
            verify_output(out)
            assert_same_output(out, ref)
        assert tree_digest(kill_family["inputs"]) == inputs_before, f"{what}: inputs changed"
        return len(listed)

    def one(mode: str, resume: bool) -> None:
        start_listed = len(journal(partial)) if (resume and partial.is_dir()) else 0
        # a run that does not resume starts over: without --overwrite it would refuse to
        # delete the completed shards a killed run left (tests/test_cli.py checks that)
        cmd = merge_cmd(kill_family["cfg"], out, "--resume" if resume else "--overwrite")
        with open(log_path, "ab") as log_file:
            rc, secs, trigger = _kill_once(cmd, out, partial, rng, mode, start_listed, n,
                                           t_ref, log_file)
        assert rc in (0, -signal.SIGKILL), f"merge exited with {rc}; see {log_path}"
        what = f"run {len(history)} ({mode}, resume={resume}, {trigger}, rc={rc})"
        k = check_invariants(what)
        finished = out.exists()
        history.append(dict(mode=mode, resume=resume, trigger=trigger, rc=rc,
                            secs=round(secs, 2), out=finished, partial=partial.is_dir(),
                            journaled=k, in_finish=(partial / INDEX_NAME).exists()))
        if finished:  # it completed before the kill landed: start over
            shutil.rmtree(out)

    loop_start = time.monotonic()
    for i, mode in enumerate(modes[:KILL_ITERATIONS]):
        if time.monotonic() - loop_start > KILL_LOOP_BUDGET_S:
            break
        one(mode, resume=i > 0 and rng.random() < 0.5)
    # resume must have real work to skip: make sure the last kill left 0 < k < n shards
    for _ in range(3):
        if partial.is_dir() and 0 < len(journal(partial)) < n:
            break
        one("shards", resume=False)
    print("\nkill loop:", *history, sep="\n  ")
    mid_run = [h for h in history if h["rc"] != 0 and h["partial"] and 0 < h["journaled"] < n]
    assert mid_run, f"no kill landed mid-run: {history}"
    kept = journal(partial)
    assert 0 < len(kept) < n, history
    before = file_ids(partial, kept)

    proc = subprocess.run(merge_cmd(kill_family["cfg"], out, "--resume"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    verify_output(out)
    assert_same_output(out, ref)
    assert file_ids(out, kept) == before  # the verified shards were kept, not rewritten
    assert sorted(os.listdir(work)) == ["out"]  # no partial folder, no lock file left
    assert tree_digest(kill_family["inputs"]) == inputs_before


def test_sigint_keeps_completed_shards_and_resume_finishes(kill_family, kill_reference,
                                                          tmp_path):
    """Ctrl-C (a real SIGINT) in the middle of a CLI merge: exit 130 with one line naming
    the kept shards and the command that resumes; that command finishes byte-identically."""
    ref, _ = kill_reference
    n = len(shard_names(ref))
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    proc = subprocess.Popen(merge_cmd(kill_family["cfg"], out), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(journal(partial)) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the merge finished before the SIGINT landed")
    assert proc.returncode == 130, stderr
    kept = check_partial(partial, ref)
    k = len(kept)
    assert 0 < k < n
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert f"; {k} of {n} shards are complete (" in stderr
    assert f"kept in {partial}; continue with: fastmerge merge " in stderr
    command = stderr.strip().split("continue with: fastmerge ", 1)[1]
    assert command.endswith(" --resume")
    proc = subprocess.run([sys.executable, "-m", "fastmerge", *shlex.split(command)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"resumed {k} of {n} shards\n")
    assert_same_output(out, ref)
    assert sorted(os.listdir(tmp_path)) == ["out"]


# -- 2. the lock -------------------------------------------------------------------------

def test_lock_held_refuses_second_run_and_touches_nothing(tiny_family, tiny_reference,
                                                         tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    out, partial, lock = work / "out", work / ".out.partial", work / ".out.lock"
    # the other run: holds the lock, has a journal and a shard in progress
    partial.mkdir()
    (partial / PROGRESS_NAME).write_text('{"fingerprint": "other", "shards": {}}\n')
    (partial / "model-00001-of-00007.safetensors").write_bytes(b"being written")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(CONFIG_YAML.format(base=tiny_family["base"], ct=tiny_family["models"][0],
                                      sft=tiny_family["models"][1]))
    try:
        snapshot = tree_digest(work)
        inputs = tree_digest(tiny_family["inputs"])
        for kw in ({}, {"resume": True}, {"overwrite": True}):
            with pytest.raises(OutputError, match=r"another fastmerge run is writing .*out "
                                                  r"\(lock .*\.out\.lock is held\)"):
                tiny_merge(tiny_family, out, **kw)
            assert tree_digest(work) == snapshot, kw
            assert os.stat(lock).st_ino == os.fstat(fd).st_ino
        assert cli.main(["merge", str(cfg), str(out), "--no-progress"]) == 2
        assert "is held" in capsys.readouterr().err
        assert tree_digest(work) == snapshot
        assert tree_digest(tiny_family["inputs"]) == inputs
    finally:
        os.close(fd)  # the other run dies: its lock file and partial folder stay behind
    tiny_merge(tiny_family, out)
    verify_output(out)
    assert_same_output(out, tiny_reference)
    assert sorted(os.listdir(work)) == ["out"]


def test_lock_between_two_processes(kill_family, kill_reference, tmp_path):
    ref, _ = kill_reference
    out, partial, lock = tmp_path / "out", tmp_path / ".out.partial", tmp_path / ".out.lock"
    proc = subprocess.Popen(merge_cmd(kill_family["cfg"], out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stopped = False
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and partial.exists()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGSTOP)
        stopped = True
        assert not out.exists(), "the first run finished before it could be paused"
        kwargs = load_config(kill_family["cfg"])
        with pytest.raises(OutputError, match=r"\.out\.lock is held"):
            fastmerge.merge(**kwargs, output=out, shard_size=KILL_SHARD, progress=False)
        with pytest.raises(OutputError, match=r"\.out\.lock is held"):
            fastmerge.merge(**kwargs, output=out, shard_size=KILL_SHARD, progress=False,
                            resume=True)
        assert not out.exists() and partial.is_dir() and lock.exists()
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        if proc.poll() is None and not stopped:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=300)
        err = proc.stderr.read()
        proc.stderr.close()
    assert rc == 0, err
    assert_same_output(out, ref)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_lock_is_not_won_on_a_file_being_released(tiny_family, tmp_path, monkeypatch):
    """Run B opens the lock file just before run A finishes (A unlinks it, then unlocks);
    B's flock then succeeds on the unlinked file. B must notice and lock the file at the
    path, or a third run C would lock a new file and write beside B."""
    out = tmp_path / "out"
    a = output_mod.CheckpointWriter(out, [], 1000).open()
    real_flock = fcntl.flock
    armed = {"on": True}

    def flock(fd, op):
        if armed["on"] and op & fcntl.LOCK_EX:
            armed["on"] = False
            a.abort()  # A ends between B's open() and B's flock()
        return real_flock(fd, op)

    monkeypatch.setattr(output_mod.fcntl, "flock", flock)
    b = output_mod.CheckpointWriter(out, [], 1000).open()
    monkeypatch.setattr(output_mod.fcntl, "flock", real_flock)
    try:
        with pytest.raises(OutputError, match="is held"):
            output_mod.CheckpointWriter(out, [], 1000).open()
        with pytest.raises(OutputError, match="is held"):
            tiny_merge(tiny_family, out)
    finally:
        b.abort()
    assert sorted(os.listdir(tmp_path)) == []


def test_failed_start_releases_the_lock(tiny_family, tiny_reference, tmp_path, monkeypatch):
    """An I/O error while preparing the partial folder is an OutputError and leaves the
    lock free, so the next merge in the same process can run."""
    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name == ".out.partial":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OutputError, match="Permission denied"):
        tiny_merge(tiny_family, out)
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    assert sorted(os.listdir(tmp_path)) == []
    tiny_merge(tiny_family, out)
    assert_same_output(out, tiny_reference)


# -- 3. disk full / I/O errors while writing: resumable ----------------------------------

def _inject_short_write_then_enospc(monkeypatch, ref, names, partial):
    """The disk fills in the middle of shard 3: a short write, then ENOSPC."""
    budget = {"left": sum((ref / n).stat().st_size for n in names[:2])
                      + (ref / names[2]).stat().st_size // 2}

    def write(fd, buf):
        if budget["left"] <= 0:
            raise enospc()
        n = os.write(fd, bytes(buf[:budget["left"]]))
        budget["left"] -= n
        return n

    monkeypatch.setattr(safetensors_file, "os", OsProxy(write=write))
    return names[:2], names[:2]


def _inject_dev_full(monkeypatch, ref, names, partial):
    """Shard 3's file is /dev/full: the kernel itself answers ENOSPC."""
    real_open_shard = output_mod.CheckpointWriter._open_shard

    def open_shard(self, i):
        if i == 2:
            os.symlink("/dev/full", self.partial / self.names[i])
        return real_open_shard(self, i)

    monkeypatch.setattr(output_mod.CheckpointWriter, "_open_shard", open_shard)
    return names[:2], names[:2]


def _inject_fsync_eio(monkeypatch, ref, names, partial):
    """fsync of shard 3 fails with EIO (a failing disk)."""
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.fsync(fd)

    monkeypatch.setattr(safetensors_file, "os", OsProxy(fsync=fsync))
    return names[:2], names[:2]


def _inject_journal_enospc(monkeypatch, ref, names, partial):
    """Shard 3 is complete but the journal entry for it cannot be written."""
    real = output_mod._write_json
    calls = {"n": 0}

    def write_json(path, obj):
        if path.name == PROGRESS_NAME + ".tmp":
            calls["n"] += 1
            if calls["n"] == 3:
                path.write_text('{"fingerprint": "')  # torn, then the disk is full
                raise enospc()
        return real(path, obj)

    monkeypatch.setattr(output_mod, "_write_json", write_json)
    return names[:2], names[:3]  # shard 3 stays (complete) but is not journaled


def _inject_report_enospc(monkeypatch, ref, names, partial):
    """Every shard is written; the disk fills while the report is written."""
    real = output_mod._write_json

    def write_json(path, obj):
        if path.name == REPORT_NAME:
            path.write_text('{"format": "fastm')
            raise enospc()
        return real(path, obj)

    monkeypatch.setattr(output_mod, "_write_json", write_json)
    return names, names


@pytest.mark.parametrize("inject", [
    _inject_short_write_then_enospc, _inject_dev_full, _inject_fsync_eio,
    _inject_journal_enospc, _inject_report_enospc,
], ids=["short-write-ENOSPC", "dev-full-ENOSPC", "fsync-EIO", "journal-ENOSPC",
        "report-ENOSPC"])
def test_write_fault_keeps_completed_shards_and_resume_is_byte_identical(
        tiny_family, tiny_reference, tmp_path, monkeypatch, inject):
    if inject is _inject_dev_full:
        try:
            with open("/dev/full", "wb", buffering=0) as f:
                f.write(b"x")
            pytest.skip("/dev/full does not answer ENOSPC here")
        except FileNotFoundError:
            pytest.skip("no /dev/full")
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                pytest.skip(f"/dev/full: {exc}")
    ref = tiny_reference
    names = shard_names(ref)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    inputs = tree_digest(tiny_family["inputs"])
    journaled, present = inject(monkeypatch, ref, names, partial)

    with pytest.raises(OutputError, match=r"(No space left on device|Input/output error).*"
                                          r"completed shards are kept in .*\.out\.partial"
                                          r".*resume=True"):
        tiny_merge(tiny_family, out)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [".out.partial"]  # no OUT, lock released
    assert sorted(os.listdir(partial)) == sorted([PROGRESS_NAME, *present])
    assert sorted(check_partial(partial, ref)) == sorted(journaled)
    for name in present:  # a kept, unjournaled shard is complete too (resume redoes it)
        assert (partial / name).read_bytes() == (ref / name).read_bytes(), name
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) or not os.path.exists("/dev/full")
    assert tree_digest(tiny_family["inputs"]) == inputs
    before = file_ids(partial, journaled)

    result = tiny_merge(tiny_family, out, resume=True)
    assert result.path == out
    verify_output(out)
    assert_same_output(out, ref)
    assert file_ids(out, journaled) == before  # reused, not rewritten
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert tree_digest(tiny_family["inputs"]) == inputs


# -- 3b. a completed shard damaged between the interruption and the resume --------------

def interrupt_after_shards(family, out, monkeypatch, k: int) -> list[str]:
    """A tiny merge into ``out`` that fails (EIO from fsync, as in _inject_fsync_eio) on
    shard k+1, so the first k shards are complete and journaled; returns their names."""
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == k + 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.fsync(fd)

    monkeypatch.setattr(safetensors_file, "os", OsProxy(fsync=fsync))
    with pytest.raises(OutputError, match="Input/output error.*completed shards are kept"):
        tiny_merge(family, out)
    monkeypatch.undo()
    return sorted(journal(out.parent / f".{out.name}.partial"))


def _flip_kept_byte(path: Path) -> None:
    """One bit of one tensor byte in the middle of the file changes; the size does not."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate_kept(path: Path) -> None:
    """The file loses its last 100 bytes (a tail that never reached the disk)."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("damage, victim", [(_flip_kept_byte, 1), (_truncate_kept, 3)],
                         ids=["byte-flipped", "truncated"])
def test_resume_redoes_a_completed_shard_damaged_after_the_interruption(
        tiny_family, tiny_reference, tmp_path, monkeypatch, capsys, damage, victim):
    ref = tiny_reference
    names = shard_names(ref)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    journaled = interrupt_after_shards(tiny_family, out, monkeypatch, 4)
    assert journaled == names[:4]
    assert sorted(check_partial(partial, ref)) == journaled  # all good before the damage
    bad = names[victim]
    damage(partial / bad)
    assert sha256(partial / bad) != journal(partial)[bad]
    intact = [n for n in journaled if n != bad]
    before = file_ids(partial, intact)

    result = tiny_merge(tiny_family, out, resume=True)
    assert result.path == out
    assert file_ids(out, intact) == before  # the intact shards were kept, not rewritten
    assert (out / bad).read_bytes() == (ref / bad).read_bytes()  # the damaged one redone
    assert result.report["shards"][bad] == sha256(ref / bad)
    # every output file, fastmerge_report.json included (its tensors in plan order though
    # a shard before a kept one was redone), is byte-identical to the uninterrupted merge's
    assert_same_output(out, ref)
    verify_output(out)
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {out}: {len(names)} shards")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_resume_checks_every_journal_entry_before_keeping_a_shard(
        tiny_family, tiny_reference, tmp_path, monkeypatch):
    """A journal entry that does not describe the shard exactly (no size, a wrong size,
    other tensors, not an entry at all) keeps nothing: the shard is redone, the others
    are kept, the output is byte-identical."""
    ref = tiny_reference
    names = shard_names(ref)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    journaled = interrupt_after_shards(tiny_family, out, monkeypatch, 5)
    assert journaled == names[:5]
    doc = json.loads((partial / PROGRESS_NAME).read_text())
    entries = doc["shards"]
    assert entries[names[0]]["size"] == (partial / names[0]).stat().st_size
    del entries[names[0]]["size"]                       # e.g. written by an older version
    entries[names[1]]["size"] += 8                      # the file has other bytes
    entries[names[2]]["tensors"] = entries[names[2]]["tensors"][1:]  # other tensors
    entries[names[3]] = entries[names[3]]["sha256"]     # not an entry
    (partial / PROGRESS_NAME).write_text(json.dumps(doc))
    before = file_ids(partial, names[:5])

    result = tiny_merge(tiny_family, out, resume=True)
    after = file_ids(out, names[:5])
    assert after[names[4]] == before[names[4]]  # kept
    for name in names[:4]:  # redone: new files (with the same bytes)
        assert after[name] != before[name], name
    assert_same_output(out, ref)
    verify_output(out)
    assert result.report["shards"] == {n: sha256(ref / n) for n in names}


def test_resume_keeps_a_journaled_shard_only_through_the_verified_check(tmp_path):
    """CheckpointWriter keeps exactly the shards whose files _verified_shard accepts,
    whatever the journal says: a symlink to the right bytes and a FIFO are redone."""
    tasks = [TensorTask(f"t{i}", (4,), torch.float16, True) for i in range(4)]
    out = tmp_path / "out"
    w = output_mod.CheckpointWriter(out, tasks, 8, fingerprint="fp").open()
    try:
        for i, task in enumerate(tasks):
            w.begin(task)
            w.write(task, 0, torch.full((4,), float(i), dtype=torch.float16))
            w.end(task, {"name": task.name, "i": i})
        w._drain()
    finally:
        w.abort(keep_partial=True)
    partial = tmp_path / ".out.partial"
    assert sorted(journal(partial)) == w.names
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(partial / w.names[0], real)
    os.symlink(real, partial / w.names[0])
    (partial / w.names[1]).unlink()
    os.mkfifo(partial / w.names[1])
    _truncate_kept(partial / w.names[2])
    r = output_mod.CheckpointWriter(out, tasks, 8, resume=True, fingerprint="fp").open()
    try:
        assert sorted(r.sha256) == [w.names[3]]
        assert [r.done(t) for t in tasks] == [None, None, None, {"name": "t3", "i": 3}]
        assert sorted(os.listdir(partial)) == sorted([PROGRESS_NAME, w.names[3]])
        assert list(journal(partial)) == [w.names[3]]  # the journal now says so too
    finally:
        r.abort()
    assert real.is_file()  # the symlink's target is not touched


# -- 4. fastmerge verify -------------------------------------------------------------------

def _flip_shard_byte(d, names):
    path = d / names[1]
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    return r"sha256 [0-9a-f]{64} differs from the recorded [0-9a-f]{64}"


def _delete_shard(d, names):
    (d / names[2]).unlink()
    return rf"{names[2]}: shard named in the index is missing"


def _index_names_absent_tensor(d, names):
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = names[0]
    (d / INDEX_NAME).write_text(json.dumps(index))
    return r"tensors differ from the index, e.g. 'model.layers.0.mlp.ghost.weight'"


def _index_moves_tensor(d, names):
    index = json.loads((d / INDEX_NAME).read_text())
    by_shard = {}
    for t, s in index["weight_map"].items():
        by_shard.setdefault(s, []).append(t)
    src = next(s for s in names if len(by_shard[s]) >= 2)  # it still has a tensor after
    tensor = by_shard[src][-1]
    index["weight_map"][tensor] = next(s for s in names if s != src)
    (d / INDEX_NAME).write_text(json.dumps(index))
    return rf"tensors differ from the index, e.g. '{tensor}'"


def _index_dotdot_path(d, names):
    index = json.loads((d / INDEX_NAME).read_text())
    tensor = next(iter(index["weight_map"]))
    index["weight_map"][tensor] = f"../{d.name}/{names[0]}"
    (d / INDEX_NAME).write_text(json.dumps(index))
    return rf"tensor '{tensor}' maps to an unsafe file name '\.\./"


def _missing_report(d, names):
    (d / REPORT_NAME).unlink()
    return rf"{REPORT_NAME}: missing \(not a finished fastmerge output\)"


def _missing_index(d, names):
    (d / INDEX_NAME).unlink()
    return rf"{INDEX_NAME}: missing \(not a finished fastmerge output\)"


def _report_without_checksums(d, names):
    report = json.loads((d / REPORT_NAME).read_text())
    del report["shards"]
    (d / REPORT_NAME).write_text(json.dumps(report))
    return "no shard checksums recorded"


def _report_other_shards(d, names):
    report = json.loads((d / REPORT_NAME).read_text())
    del report["shards"][names[-1]]
    (d / REPORT_NAME).write_text(json.dumps(report))
    return "index names shards .* but the report recorded"


def _truncated_header(d, names):
    path = d / names[0]
    with open(path, "r+b") as f:
        f.truncate(8 + 40)  # the length prefix and part of the JSON header
    return r"header length \d+ runs past the end of the file \(48 bytes\)"


def _truncated_data(d, names):
    path = d / names[0]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    return r"data_offsets \[\d+, \d+\] run past the end"


def _torn_index_json(d, names):
    text = (d / INDEX_NAME).read_text()
    (d / INDEX_NAME).write_text(text[:len(text) // 2])
    return rf"{INDEX_NAME}: unreadable or invalid JSON"


VERIFY_FAULTS = [_flip_shard_byte, _delete_shard, _index_names_absent_tensor,
                 _index_moves_tensor, _index_dotdot_path, _missing_report, _missing_index,
                 _report_without_checksums, _report_other_shards, _truncated_header,
                 _truncated_data, _torn_index_json]


def test_verify_cli_passes_a_good_output_and_names_the_fault(tiny_reference, tmp_path):
    good = subprocess.run([sys.executable, "-m", "fastmerge", "verify", str(tiny_reference)],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"ok: {tiny_reference}: {len(shard_names(tiny_reference))} "
                                  "shards")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_reference, bad)
    _flip_shard_byte(bad, shard_names(bad))
    proc = subprocess.run([sys.executable, "-m", "fastmerge", "verify", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("fastmerge: error: ") and "differs from the recorded" in \
        proc.stderr


@pytest.mark.parametrize("fault", VERIFY_FAULTS, ids=[f.__name__[1:] for f in VERIFY_FAULTS])
def test_verify_rejects(tiny_reference, tmp_path, capsys, fault):
    d = tmp_path / "m"
    shutil.copytree(tiny_reference, d)
    assert cli.main(["verify", str(d)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    message = fault(d, shard_names(tiny_reference))
    assert cli.main(["verify", str(d)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fastmerge: error: ")
    assert re.search(message, captured.err), captured.err
    with pytest.raises(InputError):
        verify_output(d)


def test_verify_rejects_a_file_and_a_missing_folder(tiny_reference, tmp_path, capsys):
    assert cli.main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    some_shard = tiny_reference / shard_names(tiny_reference)[0]
    assert cli.main(["verify", str(some_shard)]) == 2
    assert "not a directory" in capsys.readouterr().err


# -- 5. input errors: nothing kept, inputs untouched -------------------------------------

def _plant_nan(family, tmp_path, monkeypatch):
    """A NaN in the sft model's last tensor (lm_head), written into its safetensors file."""
    name = "lm_head.weight"
    for f in sorted(family["models"][1].glob("*.safetensors")):
        with SafetensorsFile(f) as sf:
            info = sf.tensors.get(name)
        if info is not None:
            with open(f, "r+b") as fh:
                fh.seek(info.offset + 2 * 1000)
                fh.write(b"\x00\x7e")  # fp16 NaN, little-endian
            return rf"tensor 'lm_head.weight': 1 non-finite \(NaN/Inf\) entries .*sft"
    raise AssertionError("lm_head.weight not found")


def _input_read_eio(family, tmp_path, monkeypatch):
    """The disk under the inputs fails half way through the merge: a pread (header, copied
    reads) or the page-in of a mapped view (the CPU merge's reads) fails from then on."""
    counter = {"n": 0, "fail_at": None, "mapped": 0}
    populate = safetensors_file._populate

    def fails():
        counter["n"] += 1
        return counter["fail_at"] is not None and counter["n"] >= counter["fail_at"]

    def preadv(fd, bufs, offset):
        if fails():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return os.preadv(fd, bufs, offset)

    def page_in(mapped, address, length):
        counter["mapped"] += 1
        if fails():
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        populate(mapped, address, length)

    monkeypatch.setattr(safetensors_file, "os", OsProxy(preadv=preadv))
    monkeypatch.setattr(safetensors_file, "_populate", page_in)
    tiny_merge(family, tmp_path / "count")
    shutil.rmtree(tmp_path / "count")
    assert counter["mapped"] > 0   # the merge reads through views
    counter["fail_at"], counter["n"] = counter["n"] * 2 // 3, 0
    return r"read failed (at byte \d+: Input/output error|for bytes \d+\.\.\d+: Bad address)"


@pytest.mark.parametrize("fault", [_plant_nan, _input_read_eio], ids=["nan", "read-EIO"])
def test_input_error_mid_merge_cleans_up_and_leaves_inputs_alone(tmp_path, monkeypatch, fault):
    family = write_llama_family(tmp_path / "inputs", config=PRESETS["tiny"], n_models=2,
                                seed=7, shard_size=60_000, names=("base", "ct", "sft"))
    family["inputs"] = tmp_path / "inputs"
    message = fault(family, tmp_path, monkeypatch)
    inputs = tree_digest(family["inputs"])
    closed = []
    real_close = output_mod.CheckpointWriter._close_shard

    def close_shard(self, i):
        real_close(self, i)
        closed.append(i)

    monkeypatch.setattr(output_mod.CheckpointWriter, "_close_shard", close_shard)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError, match=message):
        tiny_merge(family, work / "out")
    assert len(closed) >= 2  # it failed mid-way, after completing shards
    assert os.listdir(work) == []  # no output, no partial folder, no lock file
    assert tree_digest(family["inputs"]) == inputs

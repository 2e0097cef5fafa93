"""fastmerge.io round trips: SafetensorsWriter -> safetensors.torch.load_file and
SafetensorsFile, every dtype and edge shape, chunked reads, hashing; Checkpoint on
folders, shards and state dicts (storage order, bounded descriptors, thread safety)."""
import gc
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastmerge.errors import InputError, OutputError
from fastmerge.io import checkpoint as checkpoint_mod
from fastmerge.io import Checkpoint, SafetensorsFile, SafetensorsWriter, TensorInfo
from fastmerge.io.safetensors_file import DTYPES

DTYPE_IDS = {v: k.lower() for k, v in DTYPES.items()}
SHAPES = [(), (0,), (1,), (17,), (3, 0, 2), (5, 7), (2, 3, 4)]


def sample(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g,
                         dtype=torch.int64).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view (NaN-safe, works for float8 where torch.equal may not)."""
    return t.reshape(-1).contiguous().view(torch.uint8)


def assert_same(got: torch.Tensor, want: torch.Tensor, what=""):
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {got.shape} != {want.shape}"
    g, w = bits(got), bits(want)
    bad = (g != w).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {w.numel()} bytes differ, first at "
                              f"byte {int(bad[0])}: {int(g[bad[0]])} != {int(w[bad[0]])}")


def write_tensors(path, tensors: dict, metadata=None, chunk=None) -> str:
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = SafetensorsWriter(path, entries, metadata)
    for t in tensors.values():
        flat = t.reshape(-1)
        step = chunk or max(flat.numel(), 1)
        for s in range(0, flat.numel(), step):
            w.write(flat[s:s + step])
    return w.close()


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- writer / reader round trips ------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=lambda d: f"dtype={DTYPE_IDS[d]}")
def test_round_trip_every_dtype_and_shape(tmp_path, dtype):
    tensors = {f"t{i}": sample(s, dtype, seed=i) for i, s in enumerate(SHAPES)}
    path = tmp_path / "x.safetensors"
    digest = write_tensors(path, tensors, metadata={"format": "pt"}, chunk=5)
    assert digest == sha256_of(path)
    loaded = load_file(path)
    with SafetensorsFile(path) as f:
        assert list(f.tensors) == list(tensors)  # laid out in the given order
        assert f.metadata == {"format": "pt"}
        for name, want in tensors.items():
            assert_same(loaded[name], want, f"load_file {name}")
            assert_same(f.read(name), want, f"SafetensorsFile {name}")
            info = f.tensors[name]
            assert info.numel == want.numel() and info.itemsize == want.element_size()
            assert info.nbytes == want.numel() * want.element_size()


def test_header_is_padded_to_8_bytes_and_reads_files_from_safetensors(tmp_path):
    tensors = {"a": sample((3, 3), torch.float16), "b": sample((7,), torch.int8)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_tensors(ours, tensors)
    save_file(tensors, theirs, metadata={"k": "v"})
    n = int.from_bytes(ours.read_bytes()[:8], "little")
    assert n % 8 == 0 and ours.read_bytes()[8 + n - 1:8 + n] in (b" ", b"}")
    for p in (ours, theirs):
        with SafetensorsFile(p) as f:
            assert all(i.offset % 8 == 0 for i in list(f.tensors.values())[:1])
            for name, want in tensors.items():
                assert_same(f.read(name), want, f"{p.name} {name}")
    assert SafetensorsFile(theirs).metadata == {"k": "v"}
    assert SafetensorsFile(ours).metadata == {}


def test_no_tensors_and_metadata_only(tmp_path):
    path = tmp_path / "empty.safetensors"
    assert write_tensors(path, {}, metadata={"a": "b"}) == sha256_of(path)
    assert load_file(path) == {}
    with SafetensorsFile(path) as f:
        assert f.tensors == {} and f.metadata == {"a": "b"}


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000], ids=lambda c: f"chunk={c}")
def test_chunked_read_into_with_start_and_count(tmp_path, chunk):
    t = sample((37, 11), torch.bfloat16, seed=3)
    path = tmp_path / "c.safetensors"
    write_tensors(path, {"pad": sample((3,), torch.int8), "w": t}, chunk=13)
    flat = t.reshape(-1)
    with SafetensorsFile(path) as f:
        buf = torch.empty(chunk, dtype=torch.bfloat16)
        got = []
        for s in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - s)
            f.read_into("w", buf, s, n)
            got.append(buf[:n].clone())
        assert_same(torch.cat(got), flat, "chunked")
        # raw bytes into a buffer of another dtype, default count = to the end
        raw = torch.empty(2 * (flat.numel() - 5), dtype=torch.uint8)
        f.read_into("w", raw, 5)
        assert torch.equal(raw, bits(flat[5:]))
        # the 2-D row of a bigger buffer (what the pipeline passes)
        stacked = torch.zeros(3, 10, dtype=torch.bfloat16)
        f.read_into("w", stacked[1], 100, 10)
        assert_same(stacked[1], flat[100:110], "row")
        assert not stacked[0].any() and not stacked[2].any()
        assert f.read_into("w", torch.empty(0, dtype=torch.bfloat16), flat.numel(), 0) is not None


def test_read_into_rejects_bad_ranges_and_buffers(tmp_path):
    path = tmp_path / "r.safetensors"
    write_tensors(path, {"w": sample((10,), torch.float32)})
    with SafetensorsFile(path) as f:
        with pytest.raises(ValueError, match="start 11 is outside"):
            f.read_into("w", torch.empty(10), 11, 0)
        with pytest.raises(ValueError, match="count 6 from start 5 runs past"):
            f.read_into("w", torch.empty(10), 5, 6)
        with pytest.raises(ValueError, match="holds 16 bytes, the read needs 40"):
            f.read_into("w", torch.empty(4))
        with pytest.raises(ValueError, match="contiguous CPU tensor"):
            f.read_into("w", torch.empty(10, 2)[:, 0])
        with pytest.raises(InputError, match=r"no tensor 'nope'"):
            f.read_into("nope", torch.empty(10))
    with pytest.raises(ValueError, match="closed"):
        f.read("w")


def test_reads_do_not_map_the_file(tmp_path):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc")
    path = tmp_path / "nomap.safetensors"
    write_tensors(path, {"w": sample((1000,), torch.float32)})
    with SafetensorsFile(path) as f:
        f.read("w")
        assert str(path) not in Path("/proc/self/maps").read_text()


def _mapped(path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int64],
                         ids=lambda d: f"dtype={DTYPE_IDS[d]}")
def test_view_maps_the_range_privately_and_unmaps_when_freed(tmp_path, dtype):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc")
    path = tmp_path / "map.safetensors"
    big = sample((70_001,), dtype, seed=3)   # spans many pages; ranges start mid-page
    write_tensors(path, {"pad": sample((8,), torch.float64), "w": big})
    before = path.read_bytes()
    f = SafetensorsFile(path)
    for start, count in [(0, None), (0, 1), (1, 4096), (12_345, 50_000), (70_000, 1)]:
        v = f.view("w", start, count)
        end = big.numel() if count is None else start + count
        assert v.is_contiguous() and v.dim() == 1
        assert_same(v, big[start:end], f"view({start}, {count})")
        assert _mapped(path)
        v.fill_(0)                          # private: nothing reaches the file or others
        assert_same(f.view("w", start, count), big[start:end], "after a write")
        del v
    assert_same(f.view("w", 5, 0), big[:0], "empty")
    gc.collect()
    assert not _mapped(path)
    kept = f.view("w", 100, 10)
    f.close()                               # a view outlives the file object
    assert_same(kept, big[100:110], "after close")
    del kept
    gc.collect()
    assert not _mapped(path) and path.read_bytes() == before


def test_view_at_an_unaligned_offset_reads_a_copy(tmp_path):
    """safetensors does not align tensors: an fp32 tensor at an odd offset is read, not
    mapped (the kernels load whole elements)."""
    path = tmp_path / "odd.safetensors"
    odd, w = sample((3,), torch.int8), sample((5000,), torch.float32)
    write_tensors(path, {"odd": odd, "w": w})
    with SafetensorsFile(path) as f:
        assert f.info("w").offset % 4 != 0
        assert_same(f.view("w", 7, 4000), w[7:4007], "unaligned")
        assert_same(f.view("odd"), odd, "int8")
    with pytest.raises(ValueError, match="runs past"):
        SafetensorsFile(path).view("w", 10, 5000)


def test_view_reports_truncation_and_read_errors(tmp_path, monkeypatch):
    import errno

    from fastmerge.io import safetensors_file
    path = tmp_path / "shrinks.safetensors"
    write_tensors(path, {"a": sample((8,), torch.float32), "b": sample((4096,), torch.float32)})
    with SafetensorsFile(path) as f:
        def failing(mapped, address, length):
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        monkeypatch.setattr(safetensors_file, "_populate", failing)
        with pytest.raises(InputError, match=r"shrinks.safetensors: tensor 'b': read failed "
                                             r"for bytes \d+\.\.\d+: Bad address"):
            f.view("b", 1, 4000)
        monkeypatch.undo()
        os.truncate(path, path.stat().st_size - 4)
        assert_same(f.view("a"), sample((8,), torch.float32), "a")
        with pytest.raises(InputError, match=r"shrinks.safetensors: tensor 'b': file is "
                                             r"truncated"):
            f.view("b", 4000)


def test_file_truncated_after_open_is_reported(tmp_path):
    path = tmp_path / "shrinks.safetensors"
    write_tensors(path, {"a": sample((8,), torch.float32), "b": sample((8,), torch.float32)})
    with SafetensorsFile(path) as f:
        os.truncate(path, path.stat().st_size - 4)
        assert_same(f.read("a"), sample((8,), torch.float32), "a")
        with pytest.raises(InputError, match=r"shrinks.safetensors: tensor 'b': file is "
                                             r"truncated"):
            f.read("b")


# -- writer errors ----------------------------------------------------------------------------

def test_writer_hashes_and_writes_large_writes_in_pieces(tmp_path, monkeypatch):
    from fastmerge.io import safetensors_file
    monkeypatch.setattr(safetensors_file, "_WRITE_PIECE", 4096)
    big = sample((3 * 4096 + 7,), torch.float32, seed=9)     # 12 pieces and a tail
    path = tmp_path / "big.safetensors"
    digest = write_tensors(path, {"s": sample((3,), torch.int8), "big": big})
    assert digest == sha256_of(path)
    with SafetensorsFile(path) as f:
        assert_same(f.read("big"), big, "big")


def test_writer_accepts_bytes_and_checks_completeness(tmp_path):
    t = sample((4,), torch.float32)
    path = tmp_path / "w.safetensors"
    w = SafetensorsWriter(path, [("a", torch.float32, (4,)), ("b", torch.uint8, (3,))])
    raw = bits(t).numpy().tobytes()
    w.write(raw[:5])
    w.write(memoryview(raw[5:]))
    w.write(bytearray(b"\x01\x02"))
    assert w.position == 18 and w.total == 19
    with pytest.raises(OutputError, match=r"w.safetensors: closed after 18 of 19 data bytes; "
                                          r"tensor 'b' is incomplete"):
        w.close()


def test_writer_refuses_overflow_and_wrong_dtype(tmp_path):
    path = tmp_path / "o.safetensors"
    with pytest.raises(OutputError, match="runs past the 8 bytes the header declares"):
        with SafetensorsWriter(path, [("a", torch.float32, (2,))]) as w:
            w.write(torch.zeros(3))
    assert not path.exists()  # aborted by the context manager
    w = SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float16, (2,))])
    with pytest.raises(ValueError, match=r"tensor 'b' is torch.float16, got data of "
                                         r"torch.float32"):
        w.write(torch.zeros(3))  # would run from 'a' into 'b'
    w.write(torch.zeros(2))
    header = w.size  # the header is written at once; size then grows with the data
    assert header > 8 and header % 8 == 0 and w.position == 8
    w.write(torch.zeros(2, dtype=torch.float16))
    assert w.size == header + 4
    digest = w.close()
    assert digest == sha256_of(path) and w.close() == digest
    assert w.size == path.stat().st_size == header + 4  # what the resume journal records
    with pytest.raises(ValueError, match="repeated"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", torch.float32, (1,))] * 2)
    with pytest.raises(ValueError, match="cannot be written"):
        SafetensorsWriter(tmp_path / "c.safetensors", [("a", torch.complex64, (1,))])


def test_writer_streams_without_holding_data(tmp_path):
    # 64 MiB declared, written in 1 MiB pieces: the writer keeps no copy (checked by hash)
    n = 16 << 20
    path = tmp_path / "big.safetensors"
    piece = torch.arange(1 << 18, dtype=torch.float32)
    with SafetensorsWriter(path, [("w", torch.float32, (n,))]) as w:
        for _ in range(n // piece.numel()):
            w.write(piece)
    assert w.close() == sha256_of(path)


# -- Checkpoint -------------------------------------------------------------------------------

def make_sharded(root, n_shards=3, per_shard=2, dtype=torch.float32):
    root.mkdir(parents=True, exist_ok=True)
    weight_map, tensors = {}, {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {f"layer{s}.w{k}": sample((4, 3), dtype, seed=10 * s + k)
                for k in range(per_shard)}
        write_tensors(root / shard, part)
        weight_map.update({n: shard for n in part})
        tensors.update(part)
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tensors


def read_all(ckpt: Checkpoint) -> dict:
    out = {}
    for n in ckpt.names:
        info = ckpt.info(n)
        t = torch.empty(info.shape, dtype=info.dtype)
        ckpt.read_into(n, t, 0, info.numel)
        out[n] = t
    return out


def test_checkpoint_sharded_folder_in_storage_order(tmp_path):
    tensors = make_sharded(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    (tmp_path / "m" / "chat_template.jinja").write_text("{{ x }}")
    (tmp_path / "m" / "notes.md").write_text("no")
    with Checkpoint.open(tmp_path / "m") as c:
        assert c.names == list(tensors) and c.root == tmp_path / "m"
        assert c.label == str(tmp_path / "m") and c.config == {"model_type": "llama"}
        for n, t in read_all(c).items():
            assert_same(t, tensors[n], n)
        assert [p.name for p in c.files_to_copy()] == ["chat_template.jinja", "config.json",
                                                       "tokenizer.json"]
        assert isinstance(c.info(c.names[0]), TensorInfo)


def test_checkpoint_single_file_and_folder(tmp_path):
    tensors = {"b": sample((5,), torch.float16), "a": sample((2, 2), torch.int32)}
    (tmp_path / "d").mkdir()
    write_tensors(tmp_path / "d" / "model.safetensors", tensors)
    with Checkpoint.open(str(tmp_path / "d" / "model.safetensors"), label="mine") as c:
        assert c.label == "mine" and c.root is None and c.config is None
        assert c.names == ["b", "a"] and c.files_to_copy() == []
    with Checkpoint.open(tmp_path / "d") as c:
        assert c.root == tmp_path / "d" and c.config is None
        for n, t in read_all(c).items():
            assert_same(t, tensors[n], n)
            assert_same(c.view(n).reshape(t.shape), t, f"view of {n}")
        assert_same(c.view("b", 1, 3), tensors["b"][1:4], "view of a range")
        with pytest.raises(InputError, match="no tensor 'x'"):
            c.view("x")


def test_checkpoint_state_dict_read_into_slices():
    sd = {"w": sample((6, 5), torch.bfloat16), "s": torch.tensor(2.5),
          "t": sample((5, 6), torch.float32).t(), "e": torch.empty(0, 3)}
    c = Checkpoint.open(sd)
    assert c.names == ["w", "s", "t", "e"] and c.root is None and c.config is None
    assert c.info("w").offset == 0 and c.info("w").nbytes == 60
    buf = torch.empty(7, dtype=torch.bfloat16)
    c.read_into("w", buf, 11, 7)
    assert_same(buf, sd["w"].reshape(-1)[11:18], "slice")
    out = read_all(c)
    for n in sd:  # non-contiguous 't' comes out in logical (row-major) order
        assert_same(out[n], sd[n].contiguous(), n)
    with pytest.raises(InputError, match="'x' holds a int, not a tensor"):
        Checkpoint.open({"x": 3}, label="sd")
    v = c.view("w", 11, 7)                  # in memory: a slice, no copy
    assert_same(v, sd["w"].reshape(-1)[11:18], "view")
    assert v.data_ptr() == sd["w"].data_ptr() + 11 * 2
    assert_same(c.view("t"), sd["t"].contiguous().reshape(-1), "non-contiguous view")
    with pytest.raises(ValueError, match="runs past"):
        c.view("w", 25, 10)


def test_checkpoint_keeps_few_descriptors_and_reads_from_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_mod, "MAX_OPEN_FILES", 2)
    tensors = make_sharded(tmp_path / "m", n_shards=8)

    def open_shards():
        if not os.path.isdir("/proc/self/fd"):
            return 0
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "m"))
            except OSError:
                pass
        return n

    with Checkpoint.open(tmp_path / "m") as c:
        assert open_shards() <= 2
        errors = []

        def worker(k):
            try:
                for _ in range(20):
                    for n, t in read_all(c).items():
                        assert_same(t, tensors[n], f"thread {k} {n}")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors[0]
        assert open_shards() <= 2 + 4  # idle files are closed; busy ones only while read
    assert open_shards() == 0


def test_reopened_shard_must_be_the_file_that_was_parsed(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_mod, "MAX_OPEN_FILES", 1)
    make_sharded(tmp_path / "m", n_shards=2)
    with Checkpoint.open(tmp_path / "m") as c:
        first = c.names[0]
        shard = tmp_path / "m" / "model-00001-of-00002.safetensors"
        read_all(c)  # the first shard's descriptor is closed again
        write_tensors(shard.with_suffix(".tmp"), {n: sample((4, 3), torch.float32, seed=99)
                                                 for n in c.names[:2]})
        os.replace(shard.with_suffix(".tmp"), shard)
        with pytest.raises(InputError, match="changed on disk since it was opened"):
            c.read_into(first, torch.empty(12))


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_files_to_copy_skips_links_out_of_the_model(tmp_path):
    tensors = {"a": sample((2,), torch.float32)}
    root = tmp_path / "m"
    root.mkdir()
    write_tensors(root / "model.safetensors", tensors)
    (tmp_path / "secret").write_text("private key")
    (root / "tokenizer.model").symlink_to(tmp_path / "secret")
    (root / "real_vocab.json").write_text("{}")
    (root / "vocab.json").symlink_to("real_vocab.json")
    (root / "merges.txt").mkdir()
    with Checkpoint.open(root) as c:
        assert [p.name for p in c.files_to_copy()] == ["vocab.json"]

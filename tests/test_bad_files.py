"""Hostile inputs: a corpus of crafted bad files, each refused with an InputError naming the
file and the problem, without writing or executing anything; malicious pickles; hub-id
resolution from a fake offline cache; hypothesis fuzzing of the header parser."""
import json
import os
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastmerge.errors import InputError
from fastmerge.io import Checkpoint, SafetensorsFile
from fastmerge.io.safetensors_file import HEADER_LIMIT

from .test_safetensors_io import assert_same, read_all, sample, write_tensors


def raw_file(path, header, data=b"", length=None):
    """A safetensors-like file: header (dict -> JSON, str or bytes) with a chosen length."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                  for p in root.rglob("*"))


def refused(tmp_path, fragment, open_fn, *args, **kw):
    """open_fn must raise InputError matching fragment, leaving tmp_path unchanged."""
    before = listing(tmp_path)
    with pytest.raises(InputError) as err:
        open_fn(*args, **kw)
    assert fragment in str(err.value), f"{fragment!r} not in {str(err.value)!r}"
    assert listing(tmp_path) == before, "a refused input changed the folder"
    return str(err.value)


# -- malformed safetensors files ----------------------------------------------------------------

def _truncated(p):
    write_tensors(p, {"a": sample((4,), torch.float32), "b": sample((64,), torch.float32)})
    os.truncate(p, p.stat().st_size - 10)


CASES = {
    "truncated_shard": (_truncated, "tensor 'b': data_offsets [16, 272] run past the end of "
                                    "the data section (262 bytes): the file is truncated"),
    "tiny_file": (lambda p: p.write_bytes(b"\x01\x02\x03"), "file has 3 bytes, too few"),
    "empty_file": (lambda p: p.write_bytes(b""), "file has 0 bytes, too few"),
    "header_length_past_eof": (lambda p: raw_file(p, {}, length=1000),
                               "header length 1000 runs past the end of the file (10 bytes)"),
    "huge_header_length": (lambda p: raw_file(p, {"a": entry()}, b"\0" * 8, length=2**63 + 5),
                           f"header length {2**63 + 5} exceeds the {HEADER_LIMIT}-byte limit"),
    "non_utf8_header": (lambda p: raw_file(p, b'{"\xff\xfe": 1}'), "header is not valid UTF-8"),
    "non_json_header": (lambda p: raw_file(p, "{not json"), "header is not valid JSON"),
    "non_object_header": (lambda p: raw_file(p, "[1, 2, 3]"), "header is a JSON array, not "
                                                              "an object"),
    "deeply_nested_header": (lambda p: raw_file(p, "[" * 100_000 + "]" * 100_000),
                             "header is nested too deeply"),
    "entry_not_object": (lambda p: raw_file(p, {"w": [1, 2]}),
                         "tensor 'w': header entry is a JSON array, not an object"),
    "extra_field": (lambda p: raw_file(p, {"w": dict(entry(), extra=1)}, b"\0" * 8),
                    "tensor 'w': entry must have exactly dtype, shape and data_offsets"),
    "missing_field": (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
                      "missing ['data_offsets']"),
    "unknown_dtype": (lambda p: raw_file(p, {"w": entry("C64")}, b"\0" * 8),
                      "tensor 'w': unknown or unsupported dtype 'C64'"),
    "dtype_not_string": (lambda p: raw_file(p, {"w": entry(4)}, b"\0" * 8),
                         "tensor 'w': unknown or unsupported dtype 4"),
    "wrong_dtype_size": (lambda p: raw_file(p, {"w": entry("F16", (2,), (0, 8))}, b"\0" * 8),
                         "tensor 'w': data_offsets [0, 8] hold 8 bytes but shape [2] of F16 "
                         "needs 4"),
    "overlapping_offsets": (lambda p: raw_file(p, {"a": entry(offsets=(0, 8)),
                                                   "b": entry(offsets=(4, 12))}, b"\0" * 12),
                            "tensors 'a' [0, 8] and 'b' [4, 12] overlap"),
    "byte_range_past_eof": (lambda p: raw_file(p, {"w": entry(shape=(4,), offsets=(0, 16))},
                                               b"\0" * 8),
                            "tensor 'w': data_offsets [0, 16] run past the end of the data "
                            "section (8 bytes)"),
    "begin_after_end": (lambda p: raw_file(p, {"w": entry(shape=(0,), offsets=(8, 0))},
                                           b"\0" * 8), "need 0 <= begin <= end"),
    "negative_offset": (lambda p: raw_file(p, {"w": entry(offsets=(-8, 0))}, b"\0" * 8),
                        "need 0 <= begin <= end"),
    "offsets_not_pair": (lambda p: raw_file(p, {"w": entry(offsets=(0, 4, 8))}, b"\0" * 8),
                         "data_offsets [0, 4, 8] must be two integers"),
    "offsets_float": (lambda p: raw_file(p, {"w": entry(offsets=(0, 8.0))}, b"\0" * 8),
                      "must be two integers"),
    "negative_shape": (lambda p: raw_file(p, {"w": entry(shape=(-2,))}, b"\0" * 8),
                       "tensor 'w': shape [-2] is not a list of non-negative integers"),
    "float_shape": (lambda p: raw_file(p, {"w": entry(shape=(2.0,))}, b"\0" * 8),
                    "shape [2.0] is not a list of non-negative integers"),
    "bool_shape": (lambda p: raw_file(p, {"w": entry(shape=(True, True))}, b"\0" * 8),
                   "shape [True, True] is not a list"),
    "string_shape": (lambda p: raw_file(p, {"w": dict(entry(), shape="2")}, b"\0" * 8),
                     "shape '2' is not a list"),
    "overflowing_empty_shape": (lambda p: raw_file(p, {"w": entry(shape=(0, 2**62, 4),
                                                                  offsets=(0, 0))}),
                                "is too large (its size overflows 64-bit indexing)"),
    "duplicate_tensor_key": (lambda p: raw_file(
        p, '{"w": %s, "w": %s}' % (json.dumps(entry()), json.dumps(entry(offsets=(8, 16)))),
        b"\0" * 16), "header repeats the key 'w'"),
    "duplicate_field_key": (lambda p: raw_file(
        p, '{"w": {"dtype": "F32", "dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}',
        b"\0" * 8), "header repeats the key 'dtype'"),
    "metadata_not_strings": (lambda p: raw_file(p, {"__metadata__": {"a": 1}}),
                             "__metadata__ must be an object of string values"),
    "lone_surrogate_name": (lambda p: raw_file(p, '{"\\ud800": %s}' % json.dumps(entry()),
                                               b"\0" * 8), "name is not valid Unicode"),
}


@pytest.mark.parametrize("case", list(CASES), ids=[f"bad={c}" for c in CASES])
def test_malformed_safetensors_is_refused(tmp_path, case):
    build, fragment = CASES[case]
    path = tmp_path / f"{case}.safetensors"
    build(path)
    msg = refused(tmp_path, fragment, SafetensorsFile, path)
    assert str(path) in msg
    # the same file as a model folder's weights gives the same error through Checkpoint
    folder = tmp_path / f"dir_{case}"
    folder.mkdir()
    os.replace(path, folder / "model.safetensors")
    refused(tmp_path, fragment, Checkpoint.open, folder)


def test_not_regular_files_are_refused_without_blocking(tmp_path):
    refused(tmp_path, "not a regular file", SafetensorsFile, tmp_path)
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.safetensors")
        refused(tmp_path, "not a regular file", SafetensorsFile, tmp_path / "fifo.safetensors")
    refused(tmp_path, "no such file", SafetensorsFile, tmp_path / "missing.safetensors")


# -- sharded folders with bad indexes ----------------------------------------------------------

def sharded(root, weight_map=None, shards=None):
    """Two valid shards a/b; ``shards`` overrides their contents, ``weight_map`` the index."""
    root.mkdir()
    shards = shards or {"s1.safetensors": ["x", "y"], "s2.safetensors": ["z"]}
    default = {}
    for shard, names in shards.items():
        write_tensors(root / shard, {n: sample((3,), torch.float32) for n in names})
        default.update({n: shard for n in names})
    index = {"metadata": {}, "weight_map": default if weight_map is None else weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


INDEX_CASES = {
    "parent_traversal": ({"x": "s1.safetensors", "y": "s1.safetensors",
                          "z": "../outside.safetensors"}, None, "'..' (path traversal)"),
    "absolute_path": ({"x": "s1.safetensors", "y": "s1.safetensors",
                       "z": "/etc/passwd"}, None, "an absolute path is not allowed"),
    "path_separator": ({"x": "s1.safetensors", "y": "s1.safetensors",
                        "z": "sub/s2.safetensors"}, None, "a path separator is not allowed"),
    "backslash": ({"x": "s1.safetensors", "y": "s1.safetensors",
                   "z": "sub\\s2.safetensors"}, None, "a path separator is not allowed"),
    "empty_name": ({"x": "s1.safetensors", "y": "s1.safetensors", "z": ""}, None,
                   "must be a non-empty string"),
    "non_string_name": ({"x": "s1.safetensors", "y": "s1.safetensors", "z": 3}, None,
                        "must be a non-empty string"),
    "missing_shard": ({"x": "s1.safetensors", "y": "s1.safetensors", "z": "s9.safetensors"},
                      None, "shard 's9.safetensors' named in the index (for tensor 'z') is "
                            "missing"),
    "tensor_missing_in_shard": ({"x": "s1.safetensors", "y": "s1.safetensors",
                                 "z": "s2.safetensors", "q": "s2.safetensors"}, None,
                                "tensor 'q' is named in the index but missing from its shard "
                                "'s2.safetensors'"),
    "tensor_in_two_shards": ({"x": "s1.safetensors", "y": "s1.safetensors",
                              "z": "s2.safetensors"},
                             {"s1.safetensors": ["x", "y"], "s2.safetensors": ["z", "y"]},
                             "tensor 'y' is present in two shards, 's1.safetensors' and "
                             "'s2.safetensors'"),
    "shard_tensor_not_in_index": ({"x": "s1.safetensors", "z": "s2.safetensors"}, None,
                                  "tensor 'y' is not named in the index"),
    "tensor_in_other_shard": ({"x": "s1.safetensors", "y": "s2.safetensors",
                               "z": "s2.safetensors"}, None,
                              "tensor 'y' is listed in shard 's2.safetensors' but stored in "
                              "'s1.safetensors'"),
    "empty_weight_map": ({}, None, "no weight_map object"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES), ids=[f"index={c}" for c in INDEX_CASES])
def test_bad_index_is_refused(tmp_path, case):
    weight_map, shards, fragment = INDEX_CASES[case]
    # a valid file where a traversal would land must still not be opened
    write_tensors(tmp_path / "outside.safetensors", {"z": sample((3,), torch.float32)})
    root = sharded(tmp_path / "m", weight_map, shards)
    msg = refused(tmp_path, fragment, Checkpoint.open, root)
    assert str(root) in msg


def test_index_that_is_not_json_or_repeats_keys(tmp_path):
    root = sharded(tmp_path / "m")
    index = root / "model.safetensors.index.json"
    index.write_text("{weight_map")
    refused(tmp_path, "index is not valid JSON", Checkpoint.open, root)
    index.write_text('{"weight_map": {"x": "s1.safetensors", "x": "s2.safetensors"}}')
    refused(tmp_path, "index repeats the key 'x'", Checkpoint.open, root)
    (root / "config.json").write_text("{bad")
    index.unlink()
    (root / "s1.safetensors").rename(root / "model.safetensors")
    with Checkpoint.open(root) as c:
        refused(tmp_path, "config.json: config is not valid JSON", lambda: c.config)


def test_missing_paths_and_unknown_files(tmp_path):
    refused(tmp_path, "no such file or directory", Checkpoint.open,
            str(tmp_path / "nope" / "model.safetensors"))
    refused(tmp_path, "no such file or directory", Checkpoint.open, tmp_path / "nope")
    (tmp_path / "weights.npz").write_bytes(b"x")
    refused(tmp_path, "not a model folder, .safetensors file or pickle",
            Checkpoint.open, tmp_path / "weights.npz")
    (tmp_path / "empty").mkdir()
    refused(tmp_path, "no model.safetensors", Checkpoint.open, tmp_path / "empty")


# -- pickles --------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"with open({self.marker!r}, 'w') as f: f.write('pwned')",))


def evil_files(tmp_path):
    marker = tmp_path / "MARKER"
    legacy = pickle.dumps({"w": Payload(marker)})
    pickle.loads(legacy)  # the payload is real: loading it unsafely runs it
    assert marker.read_text() == "pwned"
    marker.unlink()
    zipped = tmp_path / "zip_dir"
    zipped.mkdir()
    torch.save({"w": torch.ones(2), "evil": Payload(marker)}, zipped / "pytorch_model.bin")
    old = tmp_path / "legacy_dir"
    old.mkdir()
    (old / "pytorch_model.bin").write_bytes(legacy)
    single = tmp_path / "evil.pt"
    torch.save(Payload(marker), single)
    return marker, [zipped, old, single]


def test_malicious_pickle_is_refused_by_default(tmp_path):
    marker, sources = evil_files(tmp_path)
    for src in sources:
        msg = refused(tmp_path, "refusing to load a pickle checkpoint", Checkpoint.open, src)
        assert "execute arbitrary code" in msg and "allow_pickle=True" in msg
        assert not marker.exists()


def test_malicious_pickle_is_refused_by_weights_only_loading(tmp_path):
    marker, (zipped, old, single) = evil_files(tmp_path)
    for src in (zipped, single):
        refused(tmp_path, "refused by weights-only loading", Checkpoint.open, src,
                allow_pickle=True)
        assert not marker.exists()
    refused(tmp_path, "legacy (pre-zip) torch pickle format", Checkpoint.open, old,
            allow_pickle=True)
    assert not marker.exists()


def test_benign_pickles_load_with_allow_pickle(tmp_path):
    sd = {"a.weight": sample((4, 3), torch.bfloat16), "a.bias": sample((3,), torch.float32)}
    (tmp_path / "m").mkdir()
    torch.save(sd, tmp_path / "m" / "pytorch_model.bin")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "x"}')
    refused(tmp_path, "refusing to load a pickle", Checkpoint.open, tmp_path / "m")
    with Checkpoint.open(tmp_path / "m", allow_pickle=True) as c:
        assert c.names == list(sd) and c.config == {"model_type": "x"}
        for n, t in read_all(c).items():
            assert_same(t, sd[n], n)
    # sharded pickles through pytorch_model.bin.index.json
    (tmp_path / "s").mkdir()
    torch.save({"a.weight": sd["a.weight"]}, tmp_path / "s" / "p1.bin")
    torch.save({"a.bias": sd["a.bias"]}, tmp_path / "s" / "p2.bin")
    (tmp_path / "s" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "p1.bin", "a.bias": "p2.bin"}}))
    refused(tmp_path, "refusing to load a pickle", Checkpoint.open, tmp_path / "s")
    with Checkpoint.open(tmp_path / "s", allow_pickle=True) as c:
        assert c.names == ["a.weight", "a.bias"]
        for n, t in read_all(c).items():
            assert_same(t, sd[n], n)
    torch.save({"state_dict": sd}, tmp_path / "nested.pt")
    refused(tmp_path, "'state_dict' holds a dict, not a tensor", Checkpoint.open,
            tmp_path / "nested.pt", allow_pickle=True)
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    refused(tmp_path, "holds a Tensor, not a state dict", Checkpoint.open,
            tmp_path / "tensor.pt", allow_pickle=True)


# -- hub ids from an offline cache --------------------------------------------------------------

def fake_hub_cache(cache, repo_id, files: dict[str, bytes], commit="0123456789abcdef" * 2 +
                   "01234567"):
    """The Hugging Face cache layout: refs/main, snapshots/<commit>/NAME -> ../../blobs/ID."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, (name, data) in enumerate(files.items()):
        blob = f"blob{i:04d}"
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/{blob}")
    return snap


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read these at import; make sure nothing can go online
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_resolves_from_offline_cache_through_blob_symlinks(tmp_path, offline_hub):
    tensors = {"x": sample((3,), torch.float32), "y": sample((2, 2), torch.float16),
               "z": sample((5,), torch.int64)}
    write_tensors(tmp_path / "s1", {"x": tensors["x"], "y": tensors["y"]})
    write_tensors(tmp_path / "s2", {"z": tensors["z"]})
    index = {"weight_map": {"x": "m-1.safetensors", "y": "m-1.safetensors",
                            "z": "m-2.safetensors"}}
    snap = fake_hub_cache(offline_hub, "org/name", {
        "m-1.safetensors": (tmp_path / "s1").read_bytes(),
        "m-2.safetensors": (tmp_path / "s2").read_bytes(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}"})
    with Checkpoint.open("org/name") as c:
        assert c.label == "org/name" and c.names == ["x", "y", "z"]
        assert os.path.realpath(c.root) == os.path.realpath(snap)
        assert c.config == {"model_type": "llama"}
        assert [p.name for p in c.files_to_copy()] == ["config.json", "tokenizer.json"]
        for n, t in read_all(c).items():
            assert_same(t, tensors[n], n)


def test_unknown_hub_id_offline_is_an_input_error_naming_it(tmp_path, offline_hub,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = refused(tmp_path, "org/missing: not a local path, and the Hugging Face hub id "
                            "could not be resolved", Checkpoint.open, "org/missing")
    assert "Error" in msg
    refused(tmp_path, "no such file or directory (and not a Hugging Face hub id)",
            Checkpoint.open, "a/b/c")
    refused(tmp_path, "no such file or directory", Checkpoint.open, "model.safetensors")


# -- fuzzing the header parser --------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "f.safetensors"


def check_parses_or_refuses(path):
    """Either an InputError, or a consistent file whose every tensor can be read."""
    size = path.stat().st_size
    try:
        f = SafetensorsFile(path)
    except InputError as exc:
        assert str(path) in str(exc)
        return
    with f:
        spans = []
        for name, info in f.tensors.items():
            assert info.nbytes == info.numel * info.itemsize
            assert 8 <= info.offset and info.offset + info.nbytes <= size, name
            if info.nbytes:
                spans.append((info.offset, info.offset + info.nbytes))
            if info.nbytes <= 1 << 20:
                t = f.read(name)
                assert t.shape == info.shape and t.dtype == info.dtype
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(fuzz_file, data):
    fuzz_file.write_bytes(data)
    check_parses_or_refuses(fuzz_file)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.integers(0, 400), body=st.binary(max_size=300))
def test_fuzz_random_header_length(fuzz_file, length, body):
    fuzz_file.write_bytes(struct.pack("<Q", length) + body)
    check_parses_or_refuses(fuzz_file)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-4, 64)
    | st.floats() | st.text(max_size=8) | st.sampled_from(["F32", "BF16", "I8", "BOOL", "F64"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=10)

VALID = {"__metadata__": {"format": "pt"},
         "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
         "b": {"dtype": "I8", "shape": [3], "data_offsets": [16, 19]},
         "c": {"dtype": "BF16", "shape": [0], "data_offsets": [19, 19]}}


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "__metadata__", "new"]),
                                    st.sampled_from(["dtype", "shape", "data_offsets", "extra",
                                                     "offset_int", "whole"]),
                                    json_values), max_size=3),
       length_delta=st.just(0) | st.integers(-20, 20),
       data_len=st.just(19) | st.integers(0, 40))
def test_fuzz_mutated_valid_headers(fuzz_file, mutations, length_delta, data_len):
    doc = json.loads(json.dumps(VALID))
    for key, field, value in mutations:
        target = doc.setdefault(key, {})
        if field == "whole" or not isinstance(target, dict):
            doc[key] = value
        elif field == "offset_int":
            offs = target.get("data_offsets")
            if isinstance(offs, list) and offs and isinstance(value, int):
                offs[abs(value) % len(offs)] = value
        elif field == "extra":
            target["extra"] = value
        else:
            target[field] = value
    header = json.dumps(doc).encode("utf-8", "surrogatepass")
    header += b" " * (-len(header) % 8)
    fuzz_file.write_bytes(struct.pack("<Q", max(0, len(header) + length_delta)) + header
                          + bytes(range(data_len)))
    check_parses_or_refuses(fuzz_file)


tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "I64", "F64", "U16"]),
    "shape": st.lists(st.integers(0, 4), max_size=3),
    "data_offsets": st.lists(st.integers(0, 80), min_size=2, max_size=2).map(sorted)})


@FUZZ
@given(tensors=st.dictionaries(st.text(min_size=1, max_size=4), tensor_entries, max_size=5),
       data_len=st.integers(0, 96))
def test_fuzz_random_layouts(fuzz_file, tensors, data_len):
    """Well-formed entries with random dtypes, shapes and offsets: sizes and overlaps."""
    header = json.dumps(tensors).encode("utf-8", "surrogatepass")
    fuzz_file.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_len))
    check_parses_or_refuses(fuzz_file)

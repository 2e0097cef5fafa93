"""fastmerge.merge() end to end: streaming checkpoints, in-memory state dicts, errors.

The streaming merge must equal the reference applied tensor by tensor (thresholds by
sorting, docs/spec.md §3-§4): counts exactly, outputs bit-for-bit on the torch backend.
"""
import io
import json
import os
import shutil
import sys

import pytest
import torch

import fastmerge
from tests.checks import interrupt_at_shard
from fastmerge import pipeline, reference
from fastmerge.errors import InputError, OutputError, ParameterError
from fastmerge.io.safetensors_file import SafetensorsFile
from fastmerge.params import make_params
from fastmerge.testing import PRESETS, state_dicts, write_llama_family

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return write_llama_family(root, config=TINY, n_models=2, seed=0, shard_size=60_000,
                              names=("base", "ct", "sft"))


def load_dir(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with SafetensorsFile(path / shard) as f:
            for name in f.tensors:
                out[name] = f.read(name)
    return out


def expected_merge(base_sd, model_sds, params, out_dtype=None, thresholds=None):
    """Reference applied tensor by tensor, or with global thresholds for scope=model."""
    out, counts = {}, {}
    for name, b in base_sd.items():
        if not b.is_floating_point() or b.dim() == 0:
            out[name] = b
            continue
        m = torch.stack([sd[name] for sd in model_sds])
        o, c, _ = reference.merge_one(b, m, params, out_dtype=out_dtype or b.dtype,
                                      thresholds=thresholds)
        out[name], counts[name] = o, c
    return out, counts


def model_scope_thresholds(base_sd, model_sds, params):
    """Brute force: concatenate every merged |τ_i| of the model and sort."""
    names = [n for n, b in base_sd.items() if b.is_floating_point() and b.dim() > 0]
    tau = torch.cat([reference.task_vectors(base_sd[n].reshape(-1), torch.stack(
        [sd[n].reshape(-1) for sd in model_sds])).abs() for n in names], dim=1)
    pairs = [reference.thresholds_by_sort(tau[i], params.density[i], params.slack[i])
             for i in range(len(model_sds))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def read_family(family):
    return load_dir_or_file(family["base"]), [load_dir_or_file(p) for p in family["models"]]


def load_dir_or_file(path):
    from fastmerge.io.checkpoint import Checkpoint
    with Checkpoint.open(path) as c:
        out = {}
        for n in c.names:
            info = c.info(n)
            t = torch.empty(info.shape, dtype=info.dtype)
            c.read_into(n, t.view(-1) if t.dim() else t.view(1), 0, info.numel)
            out[n] = t
        return out


@pytest.mark.parametrize("method, kw", [
    ("ties_sv", dict(density=0.3, slack=[0.02, 0.05])),
    ("ties", dict(density=[0.2, 0.5], weights=[1.0, 0.5])),
    ("ties_sv", dict(density=0.2, slack=0.1, elect="count", normalize=False, scale=0.5)),
    ("task_arithmetic", dict(weights=[0.5, 1.25])),
    ("linear", dict(weights=[1.0, 3.0])),
], ids=["ties_sv", "ties-weights", "ties_sv-count-nonorm-scale", "task_arithmetic", "linear"])
def test_checkpoint_merge_equals_reference(family, tmp_path, method, kw):
    result = fastmerge.merge(family["base"], family["models"], method=method, backend="torch",
                             output=tmp_path / "out", shard_size=50_000, progress=False, **kw)
    got = load_dir(result.path)
    base_sd, model_sds = read_family(family)
    params = make_params(method, 2, **kw)
    want, counts = expected_merge(base_sd, model_sds, params)
    assert list(got) == list(want)  # same names, same order as the base
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    for entry in result.report["tensors"]:
        if params.trims:
            assert torch.equal(pipeline.TensorStats.from_dict(entry).counts,
                               counts[entry["name"]]), entry["name"]
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(result.report["shards"]) == set(shards)
    assert (result.path / "config.json").is_file()
    assert (result.path / "fastmerge_report.json").is_file()


def test_model_scope_equals_brute_force_global_topk(family, tmp_path, monkeypatch):
    # tiny chunks: thresholds are found by streaming chunk by chunk over every tensor
    monkeypatch.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
    from fastmerge.backends import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 1000)
    kw = dict(density=[0.2, 0.3], slack=[0.05, 0.01], scope="model")
    result = fastmerge.merge(family["base"], family["models"], method="ties_sv",
                             backend="torch", output=tmp_path / "out", progress=False, **kw)
    base_sd, model_sds = read_family(family)
    params = make_params("ties_sv", 2, **kw)
    thresholds = model_scope_thresholds(base_sd, model_sds, params)
    assert result.report["model_thresholds"] == {"t": thresholds[0], "u": thresholds[1]}
    want, _ = expected_merge(base_sd, model_sds, params, thresholds=thresholds)
    got = load_dir(result.path)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_chunked_streaming_equals_resident(family, tmp_path, monkeypatch):
    a = fastmerge.merge(family["base"], family["models"], backend="torch",
                        output=tmp_path / "a", progress=False)
    monkeypatch.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
    from fastmerge.backends import torch_backend
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", 333)
    b = fastmerge.merge(family["base"], family["models"], backend="torch",
                        output=tmp_path / "b", progress=False)
    assert a.report == b.report
    ga, gb = load_dir(a.path), load_dir(b.path)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_in_memory_state_dicts_return_state_dict_and_report():
    base_sd, model_sds = state_dicts(config=TINY, n_models=3, dtype=torch.bfloat16, seed=1)
    sd, report = fastmerge.merge(base_sd, model_sds, method="ties_sv", density=0.4,
                                 slack=0.1, backend="torch", progress=False)
    params = make_params("ties_sv", 3, density=0.4, slack=0.1)
    want, counts = expected_merge(base_sd, model_sds, params)
    assert set(sd) == set(want)
    for name in want:
        assert sd[name].shape == want[name].shape and torch.equal(sd[name], want[name]), name
    assert report["totals"][0]["protected"] > 0


def test_dtype_override_and_single_model(family, tmp_path):
    result = fastmerge.merge(family["base"], family["models"][:1], method="ties",
                             density=0.5, dtype="float32", backend="torch",
                             output=tmp_path / "o", progress=False)
    got = load_dir(result.path)
    assert all(t.dtype == torch.float32 for t in got.values() if t.is_floating_point())
    cfg = json.loads((result.path / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "float32"


def test_output_loads_in_transformers_and_runs(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = fastmerge.merge(family["base"], family["models"], output=tmp_path / "m",
                             progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(result.path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, TINY["vocab_size"]) and torch.isfinite(logits).all()


# -- errors ------------------------------------------------------------------------------

def test_parameter_errors_come_before_any_io(tmp_path):
    with pytest.raises(ParameterError, match="density of model 0"):
        fastmerge.merge(tmp_path / "nope", [tmp_path / "nope2"], density=2.0)
    with pytest.raises(ParameterError, match="unknown backend 'cuda-magic'"):
        fastmerge.merge(tmp_path / "nope", [tmp_path / "nope2"], backend="cuda-magic")
    with pytest.raises(ParameterError, match="needs a base model"):
        fastmerge.merge(None, [tmp_path / "nope"], method="ties")


def test_existing_output_is_never_overwritten(family, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        fastmerge.merge(family["base"], family["models"], output=out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    fastmerge.merge(family["base"], family["models"], output=out, overwrite=True,
                    progress=False)
    assert not (out / "keep.txt").exists() and (out / "fastmerge_report.json").exists()


def test_output_inside_an_input_is_refused(family):
    with pytest.raises(OutputError, match="inside the input model directory"):
        fastmerge.merge(family["base"], family["models"], output=family["models"][0] / "m",
                        progress=False)
    assert not (family["models"][0] / "m").exists()


def test_shape_mismatch_names_tensor_and_shapes():
    base_sd, (a, b) = state_dicts(config=TINY, n_models=2, seed=2)
    b["model.norm.weight"] = torch.ones(3)
    with pytest.raises(InputError, match=r"'model.norm.weight': shape \[3\]"):
        fastmerge.merge(base_sd, [a, b], progress=False)


def test_missing_tensor_is_named():
    base_sd, (a, b) = state_dicts(config=TINY, n_models=2, seed=2)
    del b["model.norm.weight"]
    with pytest.raises(InputError, match="missing tensor 'model.norm.weight'"):
        fastmerge.merge(base_sd, [a, b], progress=False)


def test_nan_in_input_names_tensor_and_model():
    base_sd, (a, b) = state_dicts(config=TINY, n_models=2, seed=2)
    b["model.norm.weight"][3] = float("nan")
    with pytest.raises(InputError, match="'model.norm.weight': 1 non-finite"):
        fastmerge.merge(base_sd, [a, b], backend="torch", progress=False)
    sd, _ = fastmerge.merge(base_sd, [a, b], backend="torch", allow_nonfinite=True,
                            progress=False)
    assert "model.norm.weight" in sd


NONFINITE_CASES = {
    "ties": dict(density=[0.5, 0.1, 0.2]),
    "ties_sv": dict(density=[0.5, 0.1, 0.9], slack=[0.1, 0.05, 0.3]),
    "breadcrumbs": dict(density=[0.5, 0.5, 0.5], gamma=[0.1, 0.1, 0.1]),
}


@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("backend", ["c", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("method", list(NONFINITE_CASES))
def test_thresholds_on_nonfinite_entries_are_inf(method, backend, scope):
    """allow_nonfinite with more inf (model 1) or NaN (model 2) entries than a threshold's
    rank: that threshold is +inf with its meaning (docs/spec.md §3), on every backend alike
    (the C backend refused a NaN t, the reference wrote NaN into the report), and the
    report stays strict JSON with null there."""
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.w.weight"
    base = {name: 0.05 * torch.randn(8, 16, generator=g)}

    def model(bad=None, every=1):
        d = 0.01 * torch.randn(8, 16, generator=g)
        if bad is not None:
            d.view(-1)[::every] = bad
        return {name: base[name] + d}
    models = [model(), model(float("inf"), 7), model(float("nan"), 3)]
    kw = dict(method=method, allow_nonfinite=True, progress=False, scope=scope,
              **NONFINITE_CASES[method])
    want = fastmerge.merge(base, models, backend="torch", **kw)
    got = fastmerge.merge(base, models, backend=backend, **kw)
    assert torch.equal(got.state_dict[name].nan_to_num(), want.state_dict[name].nan_to_num())
    assert got.report["tensors"] == want.report["tensors"]
    json.dumps(got.report, allow_nan=False)
    entry = got.report["tensors"][0]
    slot = {"ties": "t", "ties_sv": "u", "breadcrumbs": "h"}[method]
    thr = entry[slot] if scope == "tensor" else got.report["model_thresholds"][slot]
    assert thr[0] is not None and thr[1] is None and thr[2] is None
    if scope == "model":
        return
    inf = float("inf")
    for i, m in enumerate(models):            # the brute-force definition agrees
        a, d = (m[name] - base[name]).abs(), NONFINITE_CASES[method]["density"][i]
        if method == "breadcrumbs":
            want_pair, slots = reference.breadcrumbs_thresholds_by_sort(a, d, 0.1), ("t", "h")
        else:
            want_pair = reference.thresholds_by_sort(a, d, kw.get("slack", [0.0] * 3)[i])
            slots = ("t", "u")
        assert [inf if entry[k][i] is None else entry[k][i] for k in slots] == list(want_pair)


def test_architectures_must_agree(tmp_path):
    paths = write_llama_family(tmp_path / "f", config=TINY, n_models=1, seed=3)
    cfg_path = paths["models"][0] / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["model_type"] = "mistral"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="different architectures"):
        fastmerge.merge(paths["base"], paths["models"], output=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_non_float_and_scalar_tensors_are_copied_from_base():
    base_sd, model_sds = state_dicts(config=TINY, n_models=2, seed=4)
    for i, sd in enumerate([base_sd, *model_sds]):
        sd["buffer.int"] = torch.arange(5, dtype=torch.int64) + i
        sd["scalar"] = torch.tensor(1.5 + i)
        sd["empty"] = torch.empty(0, 4)
    sd, _ = fastmerge.merge(base_sd, model_sds, backend="torch", progress=False)
    assert torch.equal(sd["buffer.int"], base_sd["buffer.int"])
    assert torch.equal(sd["scalar"], base_sd["scalar"])
    assert sd["empty"].shape == (0, 4)


# -- resume ------------------------------------------------------------------------------

def test_resume_after_io_error_is_byte_identical(family, tmp_path, monkeypatch):
    clean = fastmerge.merge(family["base"], family["models"], output=tmp_path / "clean",
                            shard_size=40_000, progress=False)
    from fastmerge.io import safetensors_file
    real_close = safetensors_file.SafetensorsWriter.close
    calls = {"n": 0}

    def failing_close(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_close(self)

    monkeypatch.setattr(safetensors_file.SafetensorsWriter, "close", failing_close)
    out = tmp_path / "resumed"
    with pytest.raises(OutputError, match="No space left on device"):
        fastmerge.merge(family["base"], family["models"], output=out, shard_size=40_000,
                        progress=False)
    assert not out.exists()
    partial = tmp_path / ".resumed.partial"
    kept = sorted(p.name for p in partial.iterdir() if p.suffix == ".safetensors")
    assert len(kept) == 2
    (partial / ".failed.r1").write_text("a distributed rank's failure mark")  # stale
    monkeypatch.setattr(safetensors_file.SafetensorsWriter, "close", real_close)
    fastmerge.merge(family["base"], family["models"], output=out, shard_size=40_000,
                    resume=True, progress=False)
    for f in sorted(clean.path.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.path.iterdir())
    assert not partial.exists()


def test_resume_with_other_parameters_is_refused(family, tmp_path, monkeypatch):
    out = tmp_path / "o"
    partial = tmp_path / ".o.partial"
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"fingerprint": "x", "shards": {}}))
    with pytest.raises(OutputError, match="cannot resume"):
        fastmerge.merge(family["base"], family["models"], output=out, resume=True,
                        progress=False)


# -- every backend through the same pipeline -----------------------------------------------

@pytest.mark.parametrize("backend", [
    pytest.param("c"),
    pytest.param("triton", marks=pytest.mark.interpreter),
])
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_backends_through_pipeline_match_reference(family, tmp_path, backend, scope):
    """fastmerge.merge(backend=...) writes the reference's checkpoint: the same report
    (thresholds and counts) and every output within one ulp (docs/spec.md §10)."""
    from fastmerge import backends
    from tests.checks import assert_ulp_close
    try:
        backends.load(backend)
    except fastmerge.BackendUnavailable as exc:
        pytest.skip(str(exc))
    kw = dict(method="ties_sv", density=[0.3, 0.2], slack=[0.02, 0.05], scope=scope,
              progress=False, shard_size=50_000)
    ref = fastmerge.merge(family["base"], family["models"], backend="torch",
                          output=tmp_path / "ref", **kw)
    got = fastmerge.merge(family["base"], family["models"], backend=backend,
                          device="cpu", output=tmp_path / "got", **kw)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("backend", "shards")}
    assert strip(got.report) == strip(ref.report)
    a, b = load_dir(got.path), load_dir(ref.path)
    for name in b:
        assert_ulp_close(a[name], b[name], what=name)


# -- how the CPU pipeline reads ----------------------------------------------------------

def test_cpu_reads_map_the_inputs_unless_their_dtypes_need_converting(family, tmp_path):
    """Inputs stored in the kernels' dtypes reach the backend as mapped rows (no copy);
    models stored in different dtypes are read into one fp32 buffer. The merge is the same."""
    from fastmerge.io import Checkpoint
    from fastmerge.plan import TensorTask
    from tests.test_safetensors_io import write_tensors
    base_sd, model_sds = read_family(family)
    sft32 = tmp_path / "sft32.safetensors"
    write_tensors(sft32, {n: t.float() if t.is_floating_point() else t
                          for n, t in model_sds[1].items()})
    name = "model.layers.0.mlp.up_proj.weight"
    task = TensorTask(name, tuple(base_sd[name].shape), base_sd[name].dtype, True)
    for models, mapped in [(family["models"], True), ([family["models"][0], sft32], False)]:
        inputs = pipeline.Inputs(Checkpoint.open(family["base"]),
                                 [Checkpoint.open(m) for m in models])
        reader = pipeline.ChunkReader(inputs, torch.device("cpu"))
        base, rows, _ = reader.read(task, 100, 5000)
        assert isinstance(rows, list) == mapped
        want = torch.stack([sd[name].reshape(-1)[100:5100].float() for sd in model_sds])
        assert torch.equal(base, base_sd[name].reshape(-1)[100:5100])
        assert torch.equal(torch.stack(list(rows)).float(), want)
    kw = dict(method="ties_sv", density=0.3, slack=0.05, backend="c", progress=False)
    a = fastmerge.merge(family["base"], family["models"], output=tmp_path / "a", **kw)
    b = fastmerge.merge(family["base"], [family["models"][0], sft32], output=tmp_path / "b", **kw)
    ga, gb = load_dir(a.path), load_dir(b.path)
    def counts(report):  # the per-model entries without the model's name (its path)
        return [{**t, "models": [{k: v for k, v in m.items() if k != "model"}
                                 for m in t.get("models", [])]} for t in report["tensors"]]
    assert counts(a.report) == counts(b.report)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_reference_takes_models_as_rows_or_a_matrix():
    from tests.checks import make_inputs, ties_cfg
    base, models = make_inputs(3, 2000, torch.bfloat16, seed=4)
    rows = list(models)
    prefixes = torch.tensor([[0, 0]] * 3)
    assert torch.equal(reference.histogram(base, rows, prefixes, 0),
                       reference.histogram(base, models, prefixes, 0))
    bounds = torch.tensor([[[0, 2**31 - 1], [-1, -1]]] * 3)
    for x, y in zip(reference.bracket(base, rows, bounds, 100),
                    reference.bracket(base, models, bounds, 100)):
        assert torch.equal(x, y)
    cfg = ties_cfg(3, [1e-3] * 3, [5e-3] * 3)
    o1, o2 = torch.empty_like(base), torch.empty_like(base)
    assert torch.equal(reference.merge(base, rows, o1, cfg), reference.merge(base, models, o2, cfg))
    assert torch.equal(o1.view(torch.int16), o2.view(torch.int16))


@pytest.mark.interpreter
def test_backend_limits_are_checked_before_any_file_is_read(tmp_path):
    """9 models on the Triton path (it merges at most 8) fail at once, naming the limit:
    the model paths do not even exist, so nothing was opened."""
    missing = [tmp_path / f"m{i}" for i in range(9)]
    with pytest.raises(fastmerge.ParameterError, match="merges at most 8 models"):
        fastmerge.merge(tmp_path / "base", missing, method="ties", backend="triton",
                        device="cpu", progress=False)
    with pytest.raises(fastmerge.InputError):      # the C backend takes 9: then the files
        fastmerge.merge(tmp_path / "base", missing, method="ties", backend="c",
                        progress=False)


# -- the API a user meets first ------------------------------------------------------------

def test_one_result_type_in_memory_and_on_disk(family, tmp_path):
    base_sd, model_sds = state_dicts(config=TINY, n_models=2, seed=5)
    mem = fastmerge.merge(base_sd, model_sds, method="ties", density=0.5, backend="torch",
                          progress=False)
    assert isinstance(mem, fastmerge.MergeResult)
    assert mem.path is None and set(mem.state_dict) == set(base_sd)
    sd, report = mem                                    # unpacks as before
    assert sd is mem.state_dict and report is mem.report and mem[0] is sd
    assert repr(mem).startswith(f"MergeResult(state_dict=<{len(base_sd)} tensors>")

    disk = fastmerge.merge(family["base"], family["models"], output=tmp_path / "o",
                           shard_size=50_000, progress=False)
    assert isinstance(disk, fastmerge.MergeResult)
    assert disk.path == tmp_path / "o" and disk.state_dict is None
    assert disk.shards_total == len(disk.report["shards"]) > 1 and disk.shards_resumed == 0
    with pytest.raises(TypeError, match="written to .* use result.path and result.report"):
        sd, report = disk


def test_method_name_in_any_case():
    base_sd, model_sds = state_dicts(config=TINY, n_models=2, seed=6)
    kw = dict(density=0.4, backend="torch", progress=False)
    want, _ = fastmerge.merge(base_sd, model_sds, method="ties", **kw)
    for name in ("TIES", "Ties", " ties "):
        got, report = fastmerge.merge(base_sd, model_sds, method=name, **kw)
        assert report["parameters"]["method"] == "ties"
        assert all(torch.equal(got[n], want[n]) for n in want)
    assert make_params("TIES-SV", 2).method == "ties_sv"
    with pytest.raises(ParameterError, match="method must be one of .* got 'TIEZ'"):
        make_params("TIEZ", 2)
    with pytest.raises(ParameterError, match="got None"):
        make_params(None, 2)


def test_dir_and_help_cover_the_api():
    import inspect
    names = dir(fastmerge)
    for name in ("merge", "MergeResult", "MergeInterrupted", "ParameterError", "__version__"):
        assert name in names, name
    doc = fastmerge.merge.__doc__
    for name in inspect.signature(fastmerge.merge).parameters:
        assert f"\n        {name}:" in doc or f"  {name}:" in doc, name
    assert "normalize" in doc and "task_arithmetic" in doc  # the per-method default


def test_in_memory_inputs_are_named_in_errors_and_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base_sd, (a, b) = state_dicts(config=TINY, n_models=2, seed=2)
    sd, report = fastmerge.merge(base_sd, [a, b], backend="torch", progress=False)
    assert report["base"] == "base" and report["models"] == ["model 0", "model 1"]
    del b["model.norm.weight"]
    with pytest.raises(InputError, match="model 1: missing tensor 'model.norm.weight' "
                                         "present in base"):
        fastmerge.merge(base_sd, [a, b], progress=False)


def test_in_memory_output_gets_a_config_or_a_warning(family, tmp_path):
    base_sd, model_sds = read_family(family)
    with pytest.warns(RuntimeWarning, match="no config.json .*base is an in-memory state "
                                            "dict.*pass config="):
        fastmerge.merge(base_sd, model_sds, output=tmp_path / "bare", progress=False)
    assert not (tmp_path / "bare" / "config.json").exists()

    cfg = json.loads((family["base"] / "config.json").read_text())
    result = fastmerge.merge(base_sd, model_sds, output=tmp_path / "dict", config=cfg,
                             dtype="float32", progress=False)
    written = json.loads((result.path / "config.json").read_text())
    assert written.get("torch_dtype", written.get("dtype")) == "float32"
    assert {k: v for k, v in written.items() if k not in ("torch_dtype", "dtype")} == \
        {k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype")}

    result = fastmerge.merge(base_sd, model_sds, output=tmp_path / "path",
                             config=family["base"] / "config.json", progress=False)
    assert json.loads((result.path / "config.json").read_text()) == cfg
    transformers = pytest.importorskip("transformers")
    transformers.AutoModelForCausalLM.from_pretrained(result.path)

    with pytest.raises(ParameterError, match="needs output="):
        fastmerge.merge(base_sd, model_sds, config=cfg, progress=False)
    with pytest.raises(ParameterError, match="not both"):
        fastmerge.merge(base_sd, model_sds, output=tmp_path / "x", config=cfg, config_from=0,
                        progress=False)
    with pytest.raises(ParameterError, match="cannot read it as JSON"):
        fastmerge.merge(base_sd, model_sds, output=tmp_path / "x", config=tmp_path / "no.json",
                        progress=False)


def test_output_folder_rules(family, tmp_path):
    clean = fastmerge.merge(family["base"], family["models"], output=tmp_path / "clean",
                            progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    deep = tmp_path / "not" / "yet" / "there"
    for out in (empty, deep):
        result = fastmerge.merge(family["base"], family["models"], output=out, progress=False)
        assert result.path == out
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in
                                                               clean.path.iterdir())
    # an output that is, or holds, an input: refused first, even with overwrite
    inputs = family["base"].parent
    before = sorted(p.name for p in inputs.iterdir())
    for out, overwrite, fragment in [
            (family["base"], False, "is the input model directory"),
            (inputs, True, "contains the input"),
            (family["models"][1] / "sub", True, "is inside the input model directory")]:
        with pytest.raises(OutputError, match=fragment):
            fastmerge.merge(family["base"], family["models"], output=out, overwrite=overwrite,
                            progress=False)
    assert sorted(p.name for p in inputs.iterdir()) == before
    assert sorted(os.listdir(tmp_path)) == ["clean", "empty", "not"]




def test_interrupted_merge_keeps_shards_until_resume_or_overwrite(family, tmp_path,
                                                                   monkeypatch):
    kw = dict(shard_size=40_000, progress=False)
    clean = fastmerge.merge(family["base"], family["models"], output=tmp_path / "clean", **kw)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    interrupt_at_shard(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt) as exc:
        fastmerge.merge(family["base"], family["models"], output=out, **kw)
    monkeypatch.undo()
    assert isinstance(exc.value, fastmerge.MergeInterrupted)
    kept = sorted(partial.glob("*.safetensors"))
    assert exc.value.shards_done == len(kept) == 3 and exc.value.partial == partial
    assert exc.value.shards_total == clean.shards_total
    assert exc.value.bytes_done == sum(p.stat().st_size for p in kept)
    assert "resume=True" in str(exc.value)
    with pytest.raises(OutputError, match=r"holds 3 completed shards .* pass resume=True "
                                          r"\(CLI: --resume\) .* or overwrite=True"):
        fastmerge.merge(family["base"], family["models"], output=out, **kw)
    assert sorted(partial.glob("*.safetensors")) == kept
    result = fastmerge.merge(family["base"], family["models"], output=out, resume=True, **kw)
    assert (result.shards_resumed, result.shards_total) == (3, clean.shards_total)
    assert result.report == clean.report
    for f in clean.path.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name

    shutil.rmtree(out)
    interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(fastmerge.MergeInterrupted):
        fastmerge.merge(family["base"], family["models"], output=out, **kw)
    monkeypatch.undo()
    result = fastmerge.merge(family["base"], family["models"], output=out, overwrite=True,
                             **kw)
    assert result.shards_resumed == 0 and not partial.exists()


RESUME_METHODS = {
    "dare_ties": dict(density=0.3, slack=[0.0, 0.05], seed=7),
    "dare_linear": dict(density=0.6, seed=3),
    "breadcrumbs_ties": dict(density=0.4, gamma=0.05),
    "della": dict(density=0.4, epsilon=0.2, slack=[0.05, 0.0]),
    "slerp": dict(t=0.3),
    "nuslerp": dict(vectors="rows"),
    "model_stock": dict(vectors="rows"),
}


@pytest.mark.parametrize("method", list(RESUME_METHODS))
def test_every_method_resumes_byte_identical(method, family, tmp_path, monkeypatch):
    """Interrupted after two shards and resumed, each method's output (random drops, rank
    stage and statistics passes included) is the uninterrupted one byte for byte."""
    models = family["models"][:1] if method == "slerp" else family["models"]
    kw = dict(method=method, shard_size=40_000, progress=False, **RESUME_METHODS[method])
    clean = fastmerge.merge(family["base"], models, output=tmp_path / "clean", **kw)
    out = tmp_path / "out"
    interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(fastmerge.MergeInterrupted):
        fastmerge.merge(family["base"], models, output=out, **kw)
    monkeypatch.undo()
    result = fastmerge.merge(family["base"], models, output=out, resume=True, **kw)
    assert (result.shards_resumed, result.shards_total) == (2, clean.shards_total)
    assert result.report == clean.report
    for f in clean.path.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.parametrize("change, fragment", [
    (dict(density=0.25), "different parameters"),
    (dict(shard_size=50_000), "a different shard plan"),
    (dict(backend="torch"), "a different backend ('c' then, 'torch' now)"),
    ("swap", "different inputs"),
])
def test_refused_resume_names_what_changed(family, tmp_path, monkeypatch, change, fragment):
    from fastmerge import backends
    try:
        backends.load("c")
    except fastmerge.BackendUnavailable as exc:
        pytest.skip(str(exc))
    kw = dict(shard_size=40_000, progress=False, backend="c")
    models = family["models"]
    out = tmp_path / "out"
    interrupt_at_shard(monkeypatch, 2)
    with pytest.raises(fastmerge.MergeInterrupted):
        fastmerge.merge(family["base"], models, output=out, **kw)
    monkeypatch.undo()
    if change == "swap":
        models, change = models[::-1], {}
    with pytest.raises(OutputError) as exc:
        fastmerge.merge(family["base"], models, output=out, resume=True, **{**kw, **change})
    assert f"cannot resume {out}" in str(exc.value) and fragment in str(exc.value)
    assert "pass overwrite=True (CLI: --overwrite) instead of resume=True" in str(exc.value)


def test_progress_bar_only_on_a_terminal(family, tmp_path, monkeypatch, capsys):
    fastmerge.merge(family["base"], family["models"], output=tmp_path / "a")  # progress=True
    assert capsys.readouterr().err == ""   # captured stderr is no terminal: nothing

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    result = fastmerge.merge(family["base"], family["models"], output=tmp_path / "b")
    text = term.getvalue()
    n = len(json.loads((result.path / "model.safetensors.index.json").read_text())
            ["weight_map"])
    assert "merging" in text and f"0/{n} tensors" in text and "B/s" in text

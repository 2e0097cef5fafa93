"""The merge report (fastmerge/report.py, docs/report.md): strict JSON, labelled model rows,
the text tables, the comparison of two merges, the per-layer plot and the command line."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge import report as R
from fastmerge.kernel_api import COUNTERS
from fastmerge.pipeline import TensorStats
from fastmerge.testing import PRESETS, state_dicts, write_llama_family


def strict_loads(text: str):
    """json.loads that refuses Infinity / -Infinity / NaN (as Node's JSON.parse does)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    """A tiny family merged with ties_sv (slack [0, 0.05], from relative paths) and with
    plain ties."""
    tmp = tmp_path_factory.mktemp("report")
    paths = write_llama_family(tmp / "fam", config=PRESETS["tiny"], n_models=2)
    cwd = os.getcwd()
    os.chdir(tmp)   # relative inputs: the report must still name them absolutely
    try:
        sv = fastmerge.merge("fam/base", ["fam/ct", "fam/sft"], method="ties_sv",
                             slack=[0, 0.05], output=tmp / "out", progress=False)
    finally:
        os.chdir(cwd)
    ties = fastmerge.merge(paths["base"], paths["models"], method="ties",
                           output=tmp / "out_ties", progress=False)
    return {"paths": paths, "sv": sv, "ties": ties, "tmp": tmp}


# -- strict JSON ---------------------------------------------------------------------------

def test_report_file_is_strict_json_with_null_for_inf_thresholds(merges):
    text = (merges["sv"].path / "fastmerge_report.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    report = strict_loads(text)
    assert report["format"] == R.FORMAT == "fastmerge-report/2"
    json.dumps(merges["sv"].report, allow_nan=False)   # the returned dict too
    # ct has slack 0: u = +inf "protects none", written as null; sft protects some
    for entry in report["tensors"]:
        assert entry["u"][0] is None
        assert isinstance(entry["u"][1], float) and entry["u"][1] > 0
        assert all(isinstance(t, float) for t in entry["t"])
    assert report == merges["sv"].report


def test_model_scope_thresholds_are_strict_json():
    base_sd, model_sds = state_dicts(config=PRESETS["tiny"], n_models=2)
    _, report = fastmerge.merge(base_sd, model_sds, method="ties_sv", density=[0.2, 0.0],
                                slack=[0.0, 0.0], scope="model", progress=False)
    assert report["model_thresholds"]["u"] == [None, None]      # protects none
    assert report["model_thresholds"]["t"][1] is None           # density 0: keeps none
    strict_loads(json.dumps(report, allow_nan=False))
    for entry in report["tensors"]:
        assert entry["t"][1] is None and entry["u"] == [None, None]
        stats = TensorStats.from_dict(entry)
        assert stats.t[1] == math.inf and stats.u == [math.inf, math.inf]


def test_tensor_stats_round_trip_with_inf_thresholds():
    counts = torch.arange(3 * len(COUNTERS), dtype=torch.int64).reshape(3, len(COUNTERS))
    s = TensorStats("model.layers.0.mlp.up_proj.weight", 1000,
                    [0.0, math.inf, 0.0007925033569335938], [math.inf, 1e-3, math.inf], counts)
    d = s.as_dict()
    assert d["t"] == [0.0, None, 0.0007925033569335938] and d["u"] == [None, 1e-3, None]
    text = json.dumps(d, allow_nan=False)        # as the resume journal stores it
    back = TensorStats.from_dict(strict_loads(text))
    assert back.t == s.t and back.u == s.u and torch.equal(back.counts, s.counts)
    assert json.dumps(back.as_dict(), allow_nan=False) == text   # byte-identical again
    # a /1 journal or report held the float inf itself: still read
    legacy = json.loads(text.replace("null", "Infinity"))
    assert TensorStats.from_dict(legacy).u == s.u
    # model labels in a report's per-model rows are ignored
    labelled = dict(d, models=[dict(model=f"m{i}", **m) for i, m in enumerate(d["models"])])
    assert torch.equal(TensorStats.from_dict(labelled).counts, s.counts)


def test_resume_reads_the_journal_back_into_the_same_report_bytes(tmp_path, monkeypatch):
    """The resume journal stores the stats dicts (null thresholds included) and a resumed
    run rebuilds the report from them: the file is byte-identical to an uninterrupted
    run's, and the journal is strict JSON too."""
    from fastmerge import output as output_mod
    from fastmerge import pipeline
    paths = write_llama_family(tmp_path / "fam", config=PRESETS["tiny"], n_models=2)
    kw = dict(method="ties_sv", slack=[0, 0.05], shard_size=50_000, progress=False)
    ref = fastmerge.merge(paths["base"], paths["models"], output=tmp_path / "ref", **kw)
    finish = output_mod.CheckpointWriter.finish

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(output_mod.CheckpointWriter, "finish", disk_full)
    with pytest.raises(fastmerge.OutputError):
        fastmerge.merge(paths["base"], paths["models"], output=tmp_path / "out", **kw)
    journal = (tmp_path / ".out.partial" / "progress.json").read_text()
    assert "null" in journal and "Infinity" not in journal
    strict_loads(journal)
    monkeypatch.setattr(output_mod.CheckpointWriter, "finish", finish)

    merged_again = []
    merge_one = pipeline.StreamMerge._merge

    def counting(self, task, src):
        merged_again.append(task.name)
        return merge_one(self, task, src)
    monkeypatch.setattr(pipeline.StreamMerge, "_merge", counting)
    got = fastmerge.merge(paths["base"], paths["models"], output=tmp_path / "out",
                          resume=True, **kw)
    # most tensors' stats came back from the journal, not from merging them again
    assert len(merged_again) < ref.report["merged_tensors"] // 2
    name = "fastmerge_report.json"
    assert (got.path / name).read_bytes() == (ref.path / name).read_bytes()


# -- labels --------------------------------------------------------------------------------

def test_models_are_labelled_with_absolute_paths(merges):
    paths, report = merges["paths"], merges["sv"].report
    want = [str(Path(p).resolve()) for p in paths["models"]]
    assert report["base"] == str(Path(paths["base"]).resolve())
    assert report["models"] == want
    assert [row["model"] for row in report["totals"]] == want
    assert [row["label"] for row in report["totals"]] == want      # the /1 key, kept
    for entry in report["tensors"]:
        assert [m["model"] for m in entry["models"]] == want
    # build_report also takes the opened checkpoints (a folder's label is resolved)
    from fastmerge.io import Checkpoint
    with Checkpoint.open(os.path.relpath(paths["models"][0])) as ckpt:
        assert R._input_label(ckpt) == want[0]


def test_labels_that_are_not_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    assert R._resolve_label("here") == str(tmp_path.resolve() / "here")
    assert R._resolve_label("./here/../here") == str(tmp_path.resolve() / "here")
    for label in ("org/model-7b", "<in-memory state dict>", "model 0", None):
        assert R._resolve_label(label) == label
    # given the opened checkpoints, an in-memory input's name is never taken for a path
    from fastmerge.io import Checkpoint
    base_sd, model_sds = state_dicts(config=PRESETS["tiny"], n_models=2)
    assert R._input_label(Checkpoint.open(base_sd, label="here")) == "here"
    assert R._input_label("here") == str(tmp_path.resolve() / "here")
    _, report = fastmerge.merge(base_sd, model_sds, method="ties", progress=False)
    names = R.short_labels(report["models"])
    assert len(set(names)) == 2
    assert all(n in R.summary(report) for n in names)


def test_short_labels():
    assert R.short_labels(["/a/x/ct", "/a/y/sft"]) == ["ct", "sft"]
    assert R.short_labels(["/a/x/m", "/a/y/m"]) == ["x/m", "y/m"]
    assert R.short_labels(["org/ct", "ct"]) == ["org/ct", "ct"]
    assert R.short_labels(["<in-memory state dict>"] * 2) == ["model 0", "model 1"]


# -- tables ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind", [
    ("model.embed_tokens.weight", "embed"),
    ("model.layers.3.self_attn.q_proj.weight", "attn.q"),
    ("model.layers.3.self_attn.k_proj.bias", "attn.k"),
    ("model.layers.3.self_attn.v_proj.weight", "attn.v"),
    ("model.layers.3.self_attn.o_proj.weight", "attn.o"),
    ("model.layers.3.self_attn.q_norm.weight", "norm"),
    ("model.layers.3.mlp.gate_proj.weight", "mlp.gate"),
    ("model.layers.3.mlp.up_proj.weight", "mlp.up"),
    ("model.layers.3.mlp.down_proj.weight", "mlp.down"),
    ("model.layers.3.input_layernorm.weight", "norm"),
    ("model.layers.3.post_attention_layernorm.weight", "norm"),
    ("model.norm.weight", "norm"),
    ("lm_head.weight", "lm_head"),
    ("model.layers.1.block_sparse_moe.gate.weight", "mlp.router"),
    ("model.layers.1.block_sparse_moe.experts.5.w1.weight", "mlp.gate"),
    ("model.layers.1.block_sparse_moe.experts.5.w2.weight", "mlp.down"),
    ("model.layers.1.block_sparse_moe.experts.5.w3.weight", "mlp.up"),
    ("model.layers.2.self_attn.qkv_proj.weight", "attn.qkv"),
    ("model.layers.2.mlp.gate_up_proj.weight", "mlp.gate_up"),
    ("gpt_neox.embed_in.weight", "embed"),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "attn.qkv"),
    ("gpt_neox.layers.0.attention.dense.weight", "attn.o"),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp.up"),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "mlp.down"),
    ("gpt_neox.final_layer_norm.weight", "norm"),
    ("embed_out.weight", "lm_head"),
    ("transformer.wte.weight", "embed"),
    ("transformer.h.0.attn.c_attn.weight", "attn.qkv"),
    ("transformer.h.0.attn.c_proj.weight", "attn.o"),
    ("transformer.h.0.mlp.c_fc.weight", "mlp.up"),
    ("transformer.h.0.mlp.c_proj.weight", "mlp.down"),
    ("transformer.h.0.ln_1.weight", "norm"),
    ("model.layers.0.some_adapter.weight", "other"),
])
def test_module_type(name, kind):
    assert R.module_type(name) == kind


def test_table_by_module_and_layer(merges):
    report = merges["sv"].report
    text = R.table(report)
    for row in ("embedding", "attn q", "attn k", "attn v", "attn o", "mlp gate", "mlp up",
                "mlp down", "norm", "lm_head"):
        assert any(line.startswith(row + " ") for line in text.splitlines()), row
    assert "other" not in text and "protected" in text and "important dropped" in text
    # the per-module rows add up to the whole population
    groups = R._by_module(report)
    assert sum(g["population"] for _, g in groups) == report["population"]
    # a line per model; ct (slack 0) has no protected set: "-", not "0"
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("attn q "))
    ct, sft = lines[i].split(), lines[i + 1].split()
    assert ct[2:4] == ["ct", "8,192"] and ct[-4:] == ["-"] * 4     # 2 layers of 64 x 64
    assert sft[0] == "sft" and sft[4] == "5.0%"                     # protected: slack 0.05
    # the numbers: sft's plain-TIES drops in the MLP down rows
    down = dict(groups)["mlp.down"]["counts"][1]
    imp, ties = down[COUNTERS.index("important_dropped")], down[
        COUNTERS.index("ties_important_dropped")]
    assert ties > imp >= 0
    assert f"{ties:,} (" in text and f"{ties - imp:,}" in text
    layers = R.table(report, by="layer")
    assert "layer 0" in layers and "layer 1" in layers and "not in a layer" in layers
    assert layers.index("layer 1") < layers.index("not in a layer")
    with pytest.raises(ValueError, match="by must be one of"):
        R.table(report, by="shard")


def test_plain_ties_has_no_protected_lines(merges):
    report = merges["ties"].report
    assert not R.has_slack(report)
    for text in (R.table(report), R.table(report, by="layer"), R.summary(report)):
        assert "protected" not in text and "important" not in text and "saved" not in text
        assert "kept" in text and "dropped by sign" in text


def test_summary(merges):
    report = merges["sv"].report
    text = R.summary(report)
    lines = text.splitlines()
    assert lines[0].startswith("fastmerge report (fastmerge-report/2): method ties_sv")
    assert "slack 0.05" in text and "all tensors" in text and "attn q" in text
    assert f"{report['population']:,}" in text
    kept = report["totals"][1]["kept"] / report["population"]
    assert f"{100 * kept:.1f}%" in text
    assert "nonfinite" not in text and "non-finite" not in text


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_methods_without_counters_get_one_line(method):
    base_sd, model_sds = state_dicts(config=PRESETS["tiny"], n_models=2)
    _, report = fastmerge.merge(base_sd, model_sds, method=method, progress=False)
    assert "totals" not in report
    for text in (R.table(report), R.summary(report)):
        assert "no per-entry decisions" in text and "kept" not in text.split("decisions")[0]
        assert "density" not in text and "slack" not in text


def test_compare(merges):
    a, b = merges["ties"].report, merges["sv"].report
    text = R.compare(a, b)
    assert text.splitlines()[0] == "A: ties, density [0.2, 0.2]"
    assert text.splitlines()[1] == "B: ties_sv, density [0.2, 0.2], slack [0, 0.05]"
    assert "note:" not in text
    g = dict(R._by_module(b))["attn.q"]
    row = g["counts"][1]
    prot = row[COUNTERS.index("protected")]
    want = (f"{row[COUNTERS.index('important_dropped')]:,} of {prot:,} "
            f"(plain TIES {row[COUNTERS.index('ties_important_dropped')]:,})")
    assert want in text
    assert "selected A" in text and "dropped by sign B" in text
    by_layer = R.compare(a, b, by="layer")
    assert "layer 0" in by_layer and "not in a layer" in by_layer
    # plain ties vs plain ties: no important-dropped columns at all
    assert "important" not in R.compare(a, a)


# -- reading files, /1 reports ---------------------------------------------------------------

def as_format_1(report: dict) -> dict:
    """A /2 report as fastmerge 0.1 wrote it: Infinity thresholds, unlabelled rows."""
    old = json.loads(json.dumps(report))
    old["format"] = "fastmerge-report/1"
    for row in old.get("totals", []):
        del row["model"]
    for entry in old["tensors"]:
        for key in ("t", "u"):
            if key in entry:
                entry[key] = [math.inf if x is None else x for x in entry[key]]
        for m in entry.get("models", []):
            del m["model"]
    return old


def test_load_folder_file_and_format_1(merges, tmp_path):
    report = merges["sv"].report
    assert R.load(merges["sv"].path) == R.load(merges["sv"].path / "fastmerge_report.json")
    assert R.load(merges["sv"].path)["tensors"] == report["tensors"]
    f = tmp_path / "old.json"
    f.write_text(json.dumps(as_format_1(report), indent=2))
    assert "Infinity" in f.read_text()
    old = R.load(f)
    assert old["format"] == "fastmerge-report/1"
    assert R.table(old) == R.table(report)
    assert R.table(old, by="layer") == R.table(report, by="layer")
    assert R.compare(old, report).count("note:") == 0
    assert R.summary(old).splitlines()[1:] == R.summary(report).splitlines()[1:]


@pytest.mark.parametrize("content, match", [
    (None, "no fastmerge_report.json"),
    ("{", "invalid JSON"),
    ('{"format": "other/1"}', "not a fastmerge report"),
    ("[1, 2]", "not a fastmerge report"),
    ('{"format": "fastmerge-report/1", "x": NaN}', "invalid JSON"),
])
def test_load_rejects(tmp_path, content, match):
    if content is not None:
        (tmp_path / "fastmerge_report.json").write_text(content)
    with pytest.raises(fastmerge.InputError, match=match):
        R.load(tmp_path)


# -- plot and command line -------------------------------------------------------------------

def test_plot_writes_a_png(merges, tmp_path):
    pytest.importorskip("matplotlib")
    one = R.plot(merges["sv"].report, tmp_path / "one.png")
    two = R.plot([merges["ties"].path, merges["sv"].report], tmp_path / "two.png",
                 labels=["ties", "ties_sv"])
    for p in (one, two):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with pytest.raises(ValueError, match="labels"):
        R.plot([merges["sv"].report], tmp_path / "x.png", labels=["a", "b"])


def test_plot_without_matplotlib_says_how_to_install(merges, tmp_path, monkeypatch):
    import sys
    for mod in list(sys.modules):
        if mod == "matplotlib" or mod.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails
    with pytest.raises(ImportError, match="pip install matplotlib"):
        R.plot(merges["sv"].report, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_main(merges, tmp_path, capsys):
    out, ties = str(merges["sv"].path), str(merges["ties"].path)
    assert R.main([out]) == 0
    assert capsys.readouterr().out.strip() == R.summary(merges["sv"].report).strip()
    assert R.main([out, "--by", "layer"]) == 0
    assert "not in a layer" in capsys.readouterr().out
    args = [ties, "--compare", out]
    try:
        import matplotlib  # noqa: F401
        args += ["--plot", str(tmp_path / "cmp.png")]
    except ImportError:
        pass
    assert R.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("A: ties, density [0.2, 0.2]\nB: ties_sv")
    if "--plot" in args:
        assert (tmp_path / "cmp.png").is_file() and "wrote" in printed
    assert R.main([str(tmp_path / "missing")]) == 2
    assert "fastmerge report: error:" in capsys.readouterr().err


def test_cli_report_command_forwards_to_report_main(merges, capsys):
    """`fastmerge report DIR` is fastmerge.report.main; it is listed in `fastmerge --help`."""
    from fastmerge import cli
    out = str(merges["sv"].path)
    assert cli.main(["report", out, "--by", "layer"]) == 0
    assert capsys.readouterr().out.strip() == R.summary(merges["sv"].report, by="layer").strip()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "report" in capsys.readouterr().out
    assert cli.main(["report", str(merges["sv"].path) + "-missing"]) == 2

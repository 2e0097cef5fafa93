"""The command line a user meets in the first hour: --version, --help, the demo, error
messages that name the file and the option, output folders, Ctrl-C and --resume.

Commands run in-process (``fastmerge.cli.main([...])``) on tiny families; one test runs
``fastmerge demo | head -3`` in a shell to see that a closed pipe ends it quietly.
"""
from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import fastmerge
from fastmerge import cli, config, methods
from fastmerge import output as output_mod
from fastmerge.testing import PRESETS, write_llama_family
from fastmerge.verify import verify_output
from tests.checks import interrupt_at_shard

CONFIG_YAML = """\
merge_method: ties_sv
base_model: {base}
models:
  - model: {ct}
    parameters: {{weight: 1.0, density: {density}}}
  - model: {sft}
    parameters: {{weight: 1.0, density: 0.3, slack: 0.05}}
"""
SHARD = "40kB"   # the tiny family's merge in 9 shards


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    paths = write_llama_family(root / "inputs", config=PRESETS["tiny"], n_models=2, seed=3,
                               shard_size=60_000, names=("base", "ct", "sft"))
    cfg = root / "merge.yml"
    cfg.write_text(CONFIG_YAML.format(base=paths["base"], ct=paths["models"][0],
                                      sft=paths["models"][1], density=0.3))
    return {"root": root, "cfg": cfg, **paths}


@pytest.fixture(scope="module")
def reference(family):
    """The uninterrupted CLI merge."""
    out = family["root"] / "reference"
    assert cli.main(["merge", str(family["cfg"]), str(out), "--no-progress",
                     "--shard-size", SHARD]) == 0
    return out


def merge_args(cfg, out, *extra) -> list[str]:
    return ["merge", str(cfg), str(out), "--no-progress", "--shard-size", SHARD, *extra]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


# -- --version and --help ---------------------------------------------------------------

def test_version_names_the_version_and_each_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fastmerge {fastmerge.__version__}\n")
    for name in ("triton", "c", "torch"):
        assert f"\n  {name} " in out
    assert "  torch   usable (PyTorch reference)" in out
    assert "--backend auto picks: " in out


def test_import_fastmerge_loads_neither_torch_nor_triton():
    code = ("import sys, fastmerge; assert 'merge' in dir(fastmerge); "
            "print('torch' in sys.modules, 'triton' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"]])
def test_help_loads_neither_torch_nor_triton(argv):
    """Help is instant: it lists the methods and keys without importing PyTorch (~1 s)."""
    code = ("import sys; from fastmerge import cli\n"
            f"try:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'triton' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: fastmerge" in proc.stdout and proc.stderr.split() == ["False", "False"]


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and "merge" in out and "verify" in out and "demo" in out


def test_merge_help_lists_every_method_key_and_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["merge", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    for m in methods.METHODS.values():
        if m.name in methods.ALIASES:        # the methods merge() accepts
            assert m.name in out and m.summary in out
    for key in (config.TOP_KEYS | config.GLOBAL_PARAMS | config.MODEL_PARAMS
                | config.MODEL_KEYS):
        assert key in out, key
    assert "docs/spec.md" in out
    for option in ("--overwrite", "--resume", "--shard-size", "--allow-pickle",
                   "--allow-nonfinite", "--device", "--backend", "--no-progress"):
        assert option in out


def test_demo_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--density D density d of both models" in out
    assert "--slack S slack s of both models" in out
    for preset in PRESETS:
        assert preset in out


def test_readme_synopsis_lists_every_option():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    for option in ("--backend", "--device", "--no-progress", "--allow-nonfinite",
                   "--allow-pickle", "--resume", "--overwrite", "--shard-size", "--preset",
                   "--density", "--slack", "--workdir", "--version"):
        assert option in block, option


# -- the demo ---------------------------------------------------------------------------

def test_demo_presets_are_the_testing_presets():
    assert list(cli.DEMO_PRESETS) == list(PRESETS)


def test_demo_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--preset", "medium"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fastmerge demo" in err and "invalid choice: 'medium'" in err
    assert all(p in err for p in PRESETS)


@pytest.mark.parametrize("argv, fragment", [
    (["--slack", "0.5"], "slack of model 0 must be in [0, density=0.2], got 0.5"),
    (["--density", "1.5"], "density of model 0 must be in [0, 1], got 1.5"),
    (["--backend", "c", "--device", "tpu"], "device must be 'auto', 'cpu' or 'cuda[:i]'"),
])
def test_demo_checks_its_arguments_before_building(monkeypatch, capsys, argv, fragment):
    def never(*a, **k):
        raise AssertionError("checkpoints built before the arguments were checked")

    monkeypatch.setattr("fastmerge.testing.write_llama_family", never)
    assert cli.main(["demo", "--no-progress", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fastmerge: error: ") and fragment in captured.err


def test_demo_prints_no_path_it_deletes(capsys, tmp_path):
    assert cli.main(["demo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "temporary folder" in out and "->" not in out and "merged" in out
    keep = tmp_path / "keep"
    assert cli.main(["demo", "--no-progress", "--workdir", str(keep)]) == 0
    out = capsys.readouterr().out
    assert f"-> {keep / 'merged'}" in out and f"under {keep / 'inputs'}" in out
    verify_output(keep / "merged")


def test_closed_stdout_ends_quietly(monkeypatch, capsys):
    class ClosedPipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["demo", "--no-progress"]) == 1
    assert capsys.readouterr().err == ""


def test_demo_piped_into_head_has_no_traceback():
    cmd = f"{shlex.quote(sys.executable)} -m fastmerge demo --no-progress | head -3"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                          text=True, timeout=300)
    assert len(proc.stdout.splitlines()) == 3
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# -- errors name the file and the option ------------------------------------------------

def test_parameter_error_names_the_config_file_and_the_model(family, tmp_path, capsys):
    cfg = tmp_path / "bad.yml"
    cfg.write_text(CONFIG_YAML.format(base=family["base"], ct=family["models"][0],
                                      sft=family["models"][1],
                                      density="[{filter: mlp, value: 1.5}, {value: 0.3}]"))
    assert cli.main(merge_args(cfg, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastmerge: error: {cfg}: tensor 'model.layers.0.mlp.")
    ct = family["models"][0]
    assert f"density of model 0 must be in [0, 1], got 1.5 (model 0 is {ct})" in err
    assert not (tmp_path / "out").exists()


def test_bad_shard_size_names_the_option_not_the_config(family, tmp_path, capsys):
    assert cli.main(["merge", str(family["cfg"]), str(tmp_path / "o"), "--shard-size",
                     "lots"]) == 2
    assert capsys.readouterr().err.startswith("fastmerge: error: --shard-size: shard_size "
                                              "must be a size")


def test_existing_output_names_the_cli_option(family, reference, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert cli.main(merge_args(family["cfg"], out)) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite to replace it" in err
    assert "overwrite=True" not in err
    assert (out / "mine.txt").read_text() == "keep"
    assert cli.main(merge_args(family["cfg"], out, "--overwrite")) == 0
    assert same_files(out, reference)


def test_output_that_is_an_input_says_so_first(family, capsys):
    base = family["base"]
    before = sorted(p.name for p in base.iterdir())
    for out, fragment in [(base, "is the input model directory"),
                          (base / "merged", "is inside the input model directory"),
                          (family["root"] / "inputs", "contains the input")]:
        for extra in ([], ["--overwrite"]):
            assert cli.main(merge_args(family["cfg"], out, *extra)) == 2
            err = capsys.readouterr().err
            assert fragment in err and "--overwrite" not in err, err
    assert sorted(p.name for p in base.iterdir()) == before
    assert not (base / "merged").exists()


def test_missing_parent_is_created_and_an_empty_folder_is_used(family, reference, tmp_path):
    deep = tmp_path / "a" / "b" / "out"
    assert cli.main(merge_args(family["cfg"], deep)) == 0
    assert same_files(deep, reference)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(merge_args(family["cfg"], empty)) == 0
    assert same_files(empty, reference)
    assert sorted(os.listdir(tmp_path)) == ["a", "empty"]   # no partial, lock or .old left


# -- Ctrl-C and --resume ----------------------------------------------------------------



def test_ctrl_c_keeps_shards_and_prints_the_resume_command(family, reference, tmp_path,
                                                           monkeypatch, capsys):
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    n = len(list(reference.glob("*.safetensors")))
    interrupt_at_shard(monkeypatch, 2)
    args = merge_args(family["cfg"], out)
    assert cli.main(args) == 130
    monkeypatch.undo()
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    kept = sorted(p.name for p in partial.glob("*.safetensors"))
    size = output_mod.format_size(sum((partial / k).stat().st_size for k in kept))
    assert len(kept) == 2
    assert lines[0] == (f"fastmerge: interrupted; 2 of {n} shards are complete ({size}) and "
                        f"kept in {partial}; continue with: fastmerge "
                        f"{shlex.join([*args, '--resume'])}")
    assert sorted(os.listdir(tmp_path)) == [".out.partial"]    # the lock is released

    # a rerun without --resume does not delete them
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{partial} holds 2 completed shards ({size})" in err
    assert "pass --resume to continue from them, or --overwrite to start over" in err
    assert sorted(p.name for p in partial.glob("*.safetensors")) == kept

    assert cli.main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.startswith(f"resumed 2 of {n} shards\n")
    assert same_files(out, reference)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_ctrl_c_before_the_first_shard_keeps_nothing(family, tmp_path, monkeypatch, capsys):
    interrupt_at_shard(monkeypatch, 0)
    assert cli.main(merge_args(family["cfg"], tmp_path / "out")) == 130
    assert capsys.readouterr().err == ("fastmerge: interrupted before the first shard was "
                                       "complete; nothing was kept\n")
    assert os.listdir(tmp_path) == []


def test_overwrite_starts_an_interrupted_merge_over(family, reference, tmp_path, monkeypatch,
                                                    capsys):
    out = tmp_path / "out"
    interrupt_at_shard(monkeypatch, 3)
    assert cli.main(merge_args(family["cfg"], out)) == 130
    monkeypatch.undo()
    assert cli.main(merge_args(family["cfg"], out, "--overwrite")) == 0
    assert same_files(out, reference)
    assert "resumed" not in capsys.readouterr().out


@pytest.mark.parametrize("change, fragment", [
    (["--shard-size", "50kB"], "a different shard plan"),
    (["--backend", "torch"], "a different backend ('c' then, 'torch' now)"),
    ("density", "different parameters"),
])
def test_refused_resume_says_what_changed(family, tmp_path, monkeypatch, capsys, change,
                                          fragment):
    from fastmerge import backends
    try:
        backends.load("c")
    except fastmerge.BackendUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "out"
    interrupt_at_shard(monkeypatch, 2)
    base = ["--backend", "c"]
    assert cli.main(merge_args(family["cfg"], out, *base)) == 130
    monkeypatch.undo()
    cfg = family["cfg"]
    if change == "density":
        cfg = tmp_path / "other.yml"
        cfg.write_text(CONFIG_YAML.format(base=family["base"], ct=family["models"][0],
                                          sft=family["models"][1], density=0.25))
        change = []
    capsys.readouterr()
    args = merge_args(cfg, out, *base, *change, "--resume")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {out}" in err and fragment in err, err
    assert "pass --overwrite instead of --resume to start over" in err

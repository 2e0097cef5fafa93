"""The lab (docs/lab.md) in its smoke version: one seed, one CT budget, a few training
steps, every merge through fastmerge.merge. Keeps `python -m fastmerge.lab` from rotting."""
import json
import random
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from fastmerge.lab import data  # noqa: E402
from fastmerge.lab.__main__ import cli  # noqa: E402
from fastmerge.lab.run import Settings, merge_configs  # noqa: E402


def test_languages_state_the_same_facts():
    w = data.make_world()
    # same random draws -> translations: the same objects, colours and places, other words
    s1 = data.sentence(w, "l1", random.Random(5))
    s2 = data.sentence(w, "l2", random.Random(5))
    assert s1 != s2
    assert not set(s1.split()) & set(s2.split()) - {".", ";"} - set(w.l1.agents)
    for o in (0, data.N_OBJECTS - 1):
        for attr in ("colour", "place"):
            p1, a1, c1 = data.question(w, "l1", o, attr)
            p2, a2, c2 = data.question(w, "l2", o, attr)
            assert c1.index(a1) == c2.index(a2)      # the same answer in both languages
    assert set(data.train_objects()).isdisjoint(data.test_objects())


def test_plain_import_leaves_the_lab_out():
    code = ("import sys, fastmerge; bad = [m for m in ('fastmerge.lab', 'transformers', "
            "'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_method_list_follows_fastmerge():
    labels = [m for _, m, _ in merge_configs(Settings())]
    assert {"task_arithmetic", "ties", "ties_sv"} <= set(labels)


def test_smoke_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x"])
    assert cli(["--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert [s["seed"] for s in r["seeds"]] == [0]
    (budget,) = r["seeds"][0]["budgets"].values()
    for name in ("ct", "ct_then_sft"):
        assert 0 <= budget[name]["l2_acc"] <= 1 and budget[name]["l2_ppl"] > 1
    merges = budget["merges"]
    assert set(merges) == {label for label, _, _ in merge_configs(Settings.smoke_settings())}
    sv = next(v for k, v in merges.items() if k.startswith("ties_sv"))
    assert sv["protected"] > 0 and 0 <= sv["ties_dropped_frac"] <= 1
    assert sv["important_dropped"] <= sv["ties_important_dropped"]
    for png in r["plots"]:
        assert (tmp_path / png).stat().st_size > 1000
    assert "| ties |" in (tmp_path / "results.md").read_text()
    w = json.loads((tmp_path / "why.json").read_text())
    (row,) = w["seeds"]
    assert 0 < row["sft_embed_nonzero"] < 1
    assert set(row["alternatives"]) == set(w["alternatives"])
    assert (tmp_path / "why.md").read_text().startswith("Seeds [0]")

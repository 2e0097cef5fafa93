"""fastmerge.testing: the synthetic Llama checkpoint families the other tests build on.

The folders must be real Hugging Face checkpoints (transformers loads and runs them),
sharded exactly like save_pretrained, deterministic, and their task vectors must have
the structure the merge methods react to: shared and private components, sign
conflicts, exact zeros, heavy tails, a CT task vector larger than the SFT one.
"""
import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from fastmerge import output, testing
from fastmerge.testing import (PRESETS, llama_config, llama_tensor_specs, state_dicts,
                               write_llama_family)

TINY = PRESETS["tiny"]
SHARD = 60_000


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return write_llama_family(tmp_path_factory.mktemp("sharded"), config=TINY, n_models=2,
                              seed=0, shard_size=SHARD)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return write_llama_family(tmp_path_factory.mktemp("single"), config=TINY, n_models=2,
                              seed=0)


def read_folder(path):
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                assert name not in out, f"{name} in two shards"
                out[name] = h.get_tensor(name)
    return out


def tau(model_sd, base_sd):
    return torch.cat([(model_sd[n].float() - base_sd[n].float()).reshape(-1) for n in base_sd])


# -- configs and names -------------------------------------------------------------------

def test_specs_match_transformers_state_dict():
    transformers = pytest.importorskip("transformers")
    for cfg in (TINY, llama_config(tie_word_embeddings=True, num_key_value_heads=4)):
        hf_cfg = transformers.LlamaConfig.from_dict(cfg)
        model = transformers.LlamaForCausalLM(hf_cfg)
        want = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
        if cfg["tie_word_embeddings"]:
            want = [kv for kv in want if kv[0] != "lm_head.weight"]
        assert llama_tensor_specs(cfg) == want


def test_presets_have_the_promised_shapes():
    n = {k: sum(math.prod(s) for _, s in llama_tensor_specs(c)) for k, c in PRESETS.items()}
    assert n["tiny"] < n["small"] < n["1b"] < n["7b"]
    assert n["1b"] == 1_100_048_384  # TinyLlama-1.1B
    assert n["7b"] == 6_738_415_616  # Llama-2-7B
    assert PRESETS["1b"]["num_key_value_heads"] == 4 and PRESETS["7b"]["hidden_size"] == 4096
    assert llama_config(rope_theta=5e5, max_position_embeddings=64)["rope_parameters"] == \
        {"rope_theta": 5e5, "rope_type": "default"}
    with pytest.raises(ValueError):
        llama_config(num_attention_heads=4, num_key_value_heads=3)


# -- real Hugging Face folders -----------------------------------------------------------

@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_folders_load_and_run_in_transformers(layout, request):
    transformers = pytest.importorskip("transformers")
    fam = request.getfixturevalue(layout)
    for path in [fam["base"], *fam["models"]]:
        cfg = transformers.AutoConfig.from_pretrained(path)
        assert cfg.model_type == "llama" and cfg.vocab_size == TINY["vocab_size"]
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert not info["mismatched_keys"], info
        assert next(model.parameters()).dtype == torch.float16
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9, 40, 2]])).logits
        assert logits.shape == (1, 5, TINY["vocab_size"]) and torch.isfinite(logits).all()
        gen = transformers.GenerationConfig.from_pretrained(path)
        assert gen.bos_token_id == 1 and gen.eos_token_id == 2


def test_tokenizer_loads_and_round_trips(single):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(single["models"][1])
    text = "Hello, the world is 42!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2
    assert all(0 <= i < TINY["vocab_size"] for i in ids) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) <= TINY["vocab_size"]


def test_files_hold_the_state_dicts_values(sharded, single):
    base_sd, model_sds = state_dicts(config=TINY, n_models=2, seed=0)
    for fam in (sharded, single):
        for path, sd in zip([fam["base"], *fam["models"]], [base_sd, *model_sds]):
            got = read_folder(path)
            assert set(got) == set(sd)
            for name, t in sd.items():
                assert got[name].dtype == torch.float16 and torch.equal(got[name], t), name


def test_shard_index_is_consistent(sharded):
    specs = llama_tensor_specs(TINY)
    for path in [sharded["base"], *sharded["models"]]:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        wmap = index["weight_map"]
        assert list(wmap) == [n for n, _ in specs]  # HF order
        listed = sorted(set(wmap.values()))
        on_disk = sorted(p.name for p in path.glob("*.safetensors"))
        assert listed == on_disk and len(listed) > 1
        n = len(listed)
        assert listed == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        total, seen = 0, []
        for shard in listed:
            with safe_open(path / shard, framework="pt") as h:
                names = list(h.keys())
                shard_bytes = 0
                for name in names:
                    assert wmap[name] == shard
                    t = h.get_slice(name)
                    shard_bytes += math.prod(t.get_shape()) * 2
                    seen.append(name)
                assert h.metadata() == {"format": "pt"}
            assert shard_bytes <= SHARD or len(names) == 1
            assert sorted(names) == sorted(k for k, v in wmap.items() if v == shard)
            total += shard_bytes
        assert sorted(seen) == sorted(wmap)  # every tensor in exactly one shard
        assert index["metadata"]["total_size"] == total
        # header: 8-byte LE length, JSON padded to 8 bytes, contiguous data offsets
        raw = (path / listed[0]).read_bytes()
        hlen = int.from_bytes(raw[:8], "little")
        assert hlen % 8 == 0
        header = json.loads(raw[8:8 + hlen])
        ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
        assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))
        assert ends[-1][1] == len(raw) - 8 - hlen


def test_one_shard_is_written_as_model_safetensors(tmp_path):
    fam = write_llama_family(tmp_path, config=TINY, n_models=1, shard_size="5GB")
    assert sorted(p.name for p in fam["base"].glob("model*")) == ["model.safetensors"]


# -- determinism -------------------------------------------------------------------------

def test_same_seed_same_bytes(sharded, tmp_path):
    again = write_llama_family(tmp_path / "again", config=TINY, n_models=2, seed=0,
                               shard_size=SHARD, workers=1)
    for a, b in zip([sharded["base"], *sharded["models"]], [again["base"], *again["models"]]):
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    other = write_llama_family(tmp_path / "other", config=TINY, n_models=2, seed=1,
                               shard_size=SHARD)
    assert (other["base"] / "config.json").read_bytes() == \
        (sharded["base"] / "config.json").read_bytes()
    for a, b in zip([sharded["base"], *sharded["models"]], [other["base"], *other["models"]]):
        assert (a / "model-00001-of-00005.safetensors").read_bytes() != \
            (b / "model-00001-of-00005.safetensors").read_bytes()


def test_chunked_generation_assembles_across_chunk_boundaries(tmp_path, monkeypatch):
    # tiny tensors fit one chunk; with small chunks every tensor spans many of them
    monkeypatch.setattr(testing, "CHUNK", 1000)
    fam = write_llama_family(tmp_path, config=TINY, n_models=2, seed=5, shard_size=SHARD)
    base_sd, model_sds = state_dicts(config=TINY, n_models=2, seed=5, workers=1)
    for path, sd in zip([fam["base"], *fam["models"]], [base_sd, *model_sds]):
        got = read_folder(path)
        assert all(torch.equal(got[n], t) for n, t in sd.items())
    t = tau(model_sds[0], base_sd)
    assert 0.03 < (t == 0).float().mean() < 0.08  # the statistics hold chunk by chunk


# -- what the task vectors look like -----------------------------------------------------

def test_task_vectors_look_like_fine_tunes():
    base_sd, (ct, sft) = state_dicts(config=TINY, n_models=2, seed=0)
    mats = {n: t for n, t in base_sd.items() if t.dim() == 2}
    base_all = torch.cat([t.float().reshape(-1) for t in mats.values()])
    assert abs(base_all.std().item() - 0.02) < 0.001
    norms = torch.cat([t.float() for n, t in base_sd.items() if t.dim() == 1])
    assert abs(norms.mean().item() - 1) < 0.02 and norms.min() > 0.7

    t_ct, t_sft = tau(ct, base_sd), tau(sft, base_sd)
    m = {n: t for n, t in base_sd.items() if t.dim() == 2}
    t_ct_m, t_sft_m = tau({n: ct[n] for n in m}, m), tau({n: sft[n] for n in m}, m)
    # CT moved further than SFT (default scales 3e-3 vs 1e-3)
    rms_ct, rms_sft = t_ct_m.pow(2).mean().sqrt(), t_sft_m.pow(2).mean().sqrt()
    assert 2.0 < rms_ct / rms_sft < 4.0 and 5e-4 < rms_sft < 2e-3
    # exact zeros: the 5% unchanged entries, plus fp16 roundings of the smallest τ
    for t in (t_ct, t_sft):
        assert 0.045 < (t == 0).float().mean() < 0.15
    # sign conflicts on ~30% of the entries both models changed
    both = (t_ct != 0) & (t_sft != 0)
    conflict = (torch.sign(t_ct) != torch.sign(t_sft))[both].float().mean()
    assert 0.27 < conflict < 0.33
    # heavy tails: kurtosis far above a Gaussian's 3, the top 1% holds > 8% of the mass
    for t in (t_ct_m, t_sft_m):
        z = t / t.std()
        assert z.pow(4).mean() > 10
        a = t.abs()
        assert a.topk(a.numel() // 100).values.sum() > 0.08 * a.sum()
    # overlap: magnitudes are correlated, top-20% sets share more than chance (20%)
    a, b = t_ct_m.abs(), t_sft_m.abs()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.2
    k = a.numel() // 5
    top_a = torch.zeros_like(a, dtype=torch.bool)
    top_a[a.topk(k).indices] = True
    top_b = torch.zeros_like(a, dtype=torch.bool)
    top_b[b.topk(k).indices] = True
    assert (top_a & top_b).sum() / k > 0.3


def test_task_vector_knobs():
    kw = dict(config=TINY, n_models=2, dtype=torch.float32, seed=3)
    base_sd, (a, b) = state_dicts(**kw, conflict=0.0, zeros=0.0, overlap=0.0,
                                  tv_scales=[1e-3, 1e-3], tail=1.0)
    ta, tb = tau(a, base_sd), tau(b, base_sd)
    # Gaussian τ in fp32: no unchanged entries but those below fp32's half ulp of θ_b
    assert (ta == 0).float().mean() < 1e-4 and (tb == 0).float().mean() < 1e-4
    e = "model.embed_tokens.weight"
    te = (a[e].float() - base_sd[e].float()).reshape(-1)
    assert abs(te.div(te.std()).pow(4).mean() - 3) < 0.3  # tail=1: Gaussian kurtosis
    both = (ta != 0) & (tb != 0)
    assert (torch.sign(ta) != torch.sign(tb))[both].sum() == 0  # no conflict: signs agree
    tbe = (b[e].float() - base_sd[e].float()).reshape(-1)
    assert abs(torch.corrcoef(torch.stack([te.abs(), tbe.abs()]))[0, 1]) < 0.05  # independent
    base_sd, (a, b) = state_dicts(**kw, conflict=0.6, zeros=0.25, overlap=1.0,
                                  tv_scales=[1e-3, 2e-3])
    ta, tb = tau(a, base_sd), tau(b, base_sd)
    assert 0.23 < (ta == 0).float().mean() < 0.27
    both = (ta != 0) & (tb != 0)
    assert 0.57 < (torch.sign(ta) != torch.sign(tb))[both].float().mean() < 0.63
    # overlap 1: the same magnitudes up to scale (fp32 rounding blurs the tiny ones)
    big = both & (ta.abs() > 1e-4)
    assert big.sum() > 0.3 * both.sum()
    ratio = tb[big].abs() / ta[big].abs()
    assert (ratio - 2).abs().max() < 5e-3
    # three models: in conflict entries the signs never all agree
    base_sd, sds = state_dicts(config=TINY, n_models=3, dtype=torch.float32, seed=3,
                               conflict=1.0, zeros=0.0)
    s = torch.stack([torch.sign(tau(sd, base_sd)) for sd in sds])
    changed = (s != 0).all(dim=0)
    assert changed.float().mean() > 0.99 and not (s == s[0]).all(dim=0)[changed].any()


def test_names_dtypes_and_sizes(tmp_path):
    fam = write_llama_family(tmp_path / "bf", config=TINY, n_models=3, dtype="bfloat16",
                             names=("b", "x"))
    assert [p.name for p in fam["models"]] == ["x", "model2", "model3"]
    cfg = json.loads((fam["base"] / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    got = read_folder(fam["models"][2])
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    only_base = write_llama_family(tmp_path / "b0", config=TINY, n_models=0)
    assert only_base["models"] == [] and (only_base["base"] / "model.safetensors").is_file()
    assert testing.parse_size("5GB") == 5 * 10**9 and testing.parse_size("2MiB") == 2 << 20
    assert testing.parse_size("5G") == 5 * 10**9 and testing.parse_size("2 mi") == 2 << 20
    with pytest.raises(ValueError):
        write_llama_family(tmp_path / "bad", config=TINY, n_models=2, tv_scales=[1e-3])


def test_command_line(tmp_path, capsys):
    assert testing.main(["--preset", "tiny", "--out", str(tmp_path), "--n-models", "2",
                         "--shard-size", "60KB"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "base") in out and str(tmp_path / "sft") in out
    assert re.search(r"written in [\d.]+ s", out)
    assert (tmp_path / "ct" / "model.safetensors.index.json").is_file()


# -- one implementation with the merge output ---------------------------------------------

def test_sizes_shards_and_files_are_the_merge_outputs_own():
    assert testing.parse_size is output.parse_size
    for bad in ("0", "-5MB", "5 parsecs", 0):
        with pytest.raises(ValueError):
            testing.parse_size(bad)
    # save_pretrained's greedy rule, as the merge output is sharded: a new shard when the
    # next tensor would overflow, a bigger one alone, None: one shard
    specs = [("a", (3,)), ("b", (2,)), ("c", (9,)), ("d", (1,)), ("e", (4,))]
    plan = output.plan_shards(specs, 5, nbytes=lambda s: math.prod(s[1]))
    assert [[n for n, _ in shard] for shard in plan] == [["a", "b"], ["c"], ["d", "e"]]
    assert output.plan_shards(specs, None, nbytes=lambda s: math.prod(s[1])) == [specs]


def test_shards_are_planned_by_plan_shards_and_written_by_safetensors_writer(
        tmp_path, monkeypatch):
    from fastmerge.io.safetensors_file import SafetensorsWriter
    planned, opened = [], []
    real_plan = output.plan_shards

    def plan(items, size, **kw):
        planned.append(size)
        return real_plan(items, size, **kw)

    class Writer(SafetensorsWriter):
        def __init__(self, path, *a, **kw):
            opened.append(path.name)
            super().__init__(path, *a, **kw)

    monkeypatch.setattr(testing, "plan_shards", plan)
    monkeypatch.setattr(testing, "SafetensorsWriter", Writer)
    fam = write_llama_family(tmp_path, config=TINY, n_models=0, shard_size="60KB")
    files = sorted(p.name for p in fam["base"].glob("*.safetensors"))
    assert planned == [60_000] and opened == files and len(files) == 5


def test_a_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    real = testing.family_tensors

    def failing(*a, **kw):
        for k, item in enumerate(real(*a, **kw)):
            if k == 6:  # up_proj of layer 0: the second shard holds gate_proj only
                raise RuntimeError("generation failed")
            yield item

    monkeypatch.setattr(testing, "family_tensors", failing)
    with pytest.raises(RuntimeError, match="generation failed"):
        write_llama_family(tmp_path, config=TINY, n_models=1, shard_size=SHARD)
    for d in ("base", "ct"):  # the complete first shard stays, the one being written goes
        assert sorted(p.name for p in (tmp_path / d).glob("*.safetensors")) == \
            ["model-00001-of-00005.safetensors"]
        with safe_open(tmp_path / d / "model-00001-of-00005.safetensors", framework="pt"):
            pass

"""Extended vocabularies (docs/spec.md §13): alignment by token, row-by-row merges of the
embedding and lm_head, the output's tokenizer and config, the report, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import fastmerge
from fastmerge.errors import InputError, ParameterError
from fastmerge.testing import CHAT_TOKENS, write_extended_vocab_family

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
NEW = 64


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("extended")
    return write_extended_vocab_family(root, "tiny", new_tokens=NEW, permuted=True)


def load(path):
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(path.glob("model*.safetensors")):
        sd.update(load_file(f))
    return sd


def truncated(fam, names=("ct", "sft")):
    """The models cut to the base's vocabulary rows (ids 0..V-1 are the base's tokens)."""
    V = fam["config"]["vocab_size"]
    return load(fam["base"]), [{k: (v[:V] if k in VOCAB else v) for k, v in load(fam[n]).items()}
                               for n in names]


def backend_ok(name):
    from fastmerge import backends
    try:
        backends.load(name)
    except fastmerge.BackendUnavailable as exc:
        pytest.skip(str(exc))


CASES = [("ties_sv", dict(density=[0.3, 0.5], slack=[0.0, 0.05])),
         ("dare_ties", dict(density=0.5, seed=3)),
         ("task_arithmetic", dict(weights=[0.7, 0.4])),
         ("della", dict(density=0.5, epsilon=0.1, slack=[0.0, 0.05], seed=2)),
         ("nuslerp", dict(weights=[0.6, 0.4])),
         ("nuslerp", dict(weights=[0.6, 0.4], vectors="rows")),
         ("model_stock", {})]
# the Triton interpreter takes ~1.5 min per case: one case (thresholds per row group)
BACKEND_CASES = [pytest.param(b, *c, id=f"{b}-{c[0]}-{k}") for b in ("torch", "c")
                 for k, c in enumerate(CASES)]
BACKEND_CASES.append(pytest.param("triton", *CASES[0], id="triton-ties_sv",
                                  marks=pytest.mark.interpreter))


@pytest.mark.parametrize("backend,method,kw", BACKEND_CASES)
def test_union_new_rows_are_the_models_and_shared_rows_the_same_merge(fam, backend, method, kw):
    """union: base tokens keep their ids and are merged exactly as the same merge of the
    base-vocabulary rows; the CT's new tokens follow at the CT's own ids with its rows bit
    for bit, then the SFT's chat tokens with its rows; every other tensor is unchanged."""
    backend_ok(backend)
    V = fam["config"]["vocab_size"]
    got, rep = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], method=method,
                               tokenizer_source="union", backend=backend, device="cpu",
                               progress=False, **kw)
    base, models = truncated(fam)
    want, want_rep = fastmerge.merge(base, models, method=method, backend=backend,
                                     device="cpu", progress=False, **kw)
    ct, sft = load(fam["ct"]), load(fam["sft"])
    for name, w in want.items():
        if name not in VOCAB:
            assert torch.equal(got[name], w), name
            continue
        g = got[name]
        assert g.shape == (V + NEW + len(CHAT_TOKENS), w.shape[1])
        assert torch.equal(g[:V], w), name
        assert torch.equal(g[V:V + NEW], ct[name][V:]), name
        assert torch.equal(g[V + NEW:], sft[name][V:]), name
    unlabel = lambda t: {**t, "models": [{k: v for k, v in m.items() if k != "model"}
                                         for m in t.get("models", [])]}
    assert [unlabel(t) for t in rep["tensors"]] == [unlabel(t) for t in want_rep["tensors"]]
    voc = rep["vocabulary"]
    assert voc["tokens"] == V + NEW + 2 and voc["source"] == "union"
    assert [x["tokens"] for x in voc["new_tokens"]] == [NEW, 2]
    assert voc["tensors"][0] == {"name": VOCAB[0], "merged": V, "averaged": 0, "copied": NEW + 2,
                                 "padding": 0}


@pytest.mark.parametrize("t", [0.3, 1.0])
def test_slerp_rows_of_the_base_tokens_are_the_slerp_of_the_base_rows(fam, t):
    """SLERP of the CT model onto the base with union: a row group is a tensor of its own
    (docs/spec.md §13): the base's tokens are the SLERP of those rows, with the statistics
    of those rows only; the CT's new tokens (the base lacks them) are its rows."""
    backend_ok("c")
    V = fam["config"]["vocab_size"]
    kw = dict(method="slerp", t=t, backend="c", progress=False)
    got, rep = fastmerge.merge(fam["base"], [fam["ct"]], tokenizer_source="union", **kw)
    base, (ct_cut,) = truncated(fam, names=("ct",))
    want, want_rep = fastmerge.merge(base, [ct_cut], **kw)
    ct = load(fam["ct"])
    for name in VOCAB:
        assert torch.equal(got[name][:V], want[name]), name
        assert torch.equal(got[name][V:], ct[name][V:]), name
    geo = {t["name"]: t["geometry"] for t in rep["tensors"]}
    assert geo == {t["name"]: t["geometry"] for t in want_rep["tensors"]}


@pytest.mark.parametrize("backend", ["torch", "c"])
def test_source_base_is_the_merge_of_the_base_rows_and_reports_what_is_left_out(fam, backend):
    backend_ok(backend)
    kw = dict(method="ties", density=0.4, scope="model", backend=backend, progress=False)
    got, rep = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], tokenizer_source="base",
                               **kw)
    want, want_rep = fastmerge.merge(*truncated(fam), **kw)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert rep["model_thresholds"] == want_rep["model_thresholds"]
    assert [x["tokens"] for x in rep["vocabulary"]["not_in_output"]] == [NEW, 2]


def test_permuted_vocabulary_is_aligned_by_token(fam):
    """perm is the SFT model with the base's ids shuffled: merged by token it gives the
    SFT merge's rows (the chat tokens aside), bit for bit."""
    kw = dict(method="ties_sv", density=0.3, slack=0.05, tokenizer_source="union",
              backend="c", progress=False)
    backend_ok("c")
    a, _ = fastmerge.merge(fam["base"], [fam["ct"], fam["perm"]], **kw)
    b, _ = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], **kw)
    V = fam["config"]["vocab_size"]
    for name in a:
        n = V + NEW if name in VOCAB else None
        assert torch.equal(a[name][:n], b[name][:n]), name


def test_model_source_and_padding(fam):
    """source = the CT: its vocabulary, ids and rows for its new tokens; padding rows are
    the fp64 mean of the token rows, rounded once."""
    got, rep = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], method="ties",
                               density=0.5, tokenizer_source=0, pad_to_multiple_of=128,
                               backend="torch", progress=False)
    V = fam["config"]["vocab_size"]
    ct = load(fam["ct"])
    from fastmerge.reference import round_once
    for name in VOCAB:
        g = got[name]
        assert g.shape[0] == 384 and rep["vocabulary"]["rows"] == 384
        assert torch.equal(g[V:V + NEW], ct[name][V:])
        mean = torch.zeros(g.shape[1], dtype=torch.float64)
        for row in g[:V + NEW]:
            mean += row.double()
        assert torch.equal(g[V + NEW:], round_once(mean / (V + NEW), g.dtype).expand(384 - V - NEW, -1))
    assert rep["vocabulary"]["tensors"][0]["padding"] == 384 - V - NEW


def test_same_vocabulary_needs_no_alignment(fam):
    """Aligning identical vocabularies changes nothing."""
    a, _ = fastmerge.merge(fam["base"], [fam["base"]], method="ties", density=0.5,
                           tokenizer_source="union", backend="torch", progress=False)
    b, _ = fastmerge.merge(fam["base"], [fam["base"]], method="ties", density=0.5,
                           backend="torch", progress=False)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_model_without_the_token_casts_no_vote(fam, tmp_path):
    """A model lacking some base tokens: those rows are merged among the others, as the
    same merge of just those rows would be (thresholds over that group of rows)."""
    d = tmp_path / "ct-less"
    shutil.copytree(fam["ct"], d)
    doc = json.loads((d / "tokenizer.json").read_text())
    drop = [t for t, i in doc["model"]["vocab"].items() if 100 <= i < 110]
    for t in drop:
        del doc["model"]["vocab"][t]
    doc["model"]["merges"] = [m for m in doc["model"]["merges"]
                              if "".join(m.split(" ") if isinstance(m, str) else m) not in drop
                              and not set(m.split(" ") if isinstance(m, str) else m) & set(drop)]
    (d / "tokenizer.json").write_text(json.dumps(doc))
    kw = dict(method="ties", density=0.5, backend="torch", progress=False)
    got, rep = fastmerge.merge(fam["base"], [d, fam["sft"]], tokenizer_source="base", **kw)
    base, sft = load(fam["base"]), load(fam["sft"])
    for name in VOCAB:
        one, _ = fastmerge.merge({"w": base[name][100:110]}, [{"w": sft[name][100:110]}], **kw)
        assert torch.equal(got[name][100:110], one["w"]), name
    assert rep["vocabulary"]["missing_tokens"] == [{"model": str(d), "tokens": 10}]


def test_output_loads_and_tokenizes_like_the_ct_model(fam, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastmerge.testing import pseudo_text, _SCRIPT
    out = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], method="ties", density=0.5,
                          tokenizer_source="union", config_from=1, output=tmp_path / "o",
                          backend="torch", progress=False)
    cfg = json.loads((out.path / "config.json").read_text())
    assert cfg["vocab_size"] == fam["config"]["vocab_size"] + NEW + 2
    tok = transformers.AutoTokenizer.from_pretrained(out.path)
    ct_tok = transformers.AutoTokenizer.from_pretrained(fam["ct"])
    text = " ".join(pseudo_text(_SCRIPT, 50, 99)) + " hello world"
    assert tok(text)["input_ids"] == ct_tok(text)["input_ids"]
    assert tok.convert_tokens_to_ids(list(CHAT_TOKENS)) == [cfg["vocab_size"] - 2,
                                                            cfg["vocab_size"] - 1]
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    model = transformers.AutoModelForCausalLM.from_pretrained(out.path)
    ids = torch.tensor([tok(text)["input_ids"][:32]])
    assert model(ids).logits.shape[-1] == cfg["vocab_size"]


def test_yaml_keys_and_cli_config_from(fam, tmp_path):
    from fastmerge.config import config_to_kwargs
    doc = {"merge_method": "ties", "base_model": str(fam["base"]),
           "models": [{"model": str(fam["ct"]), "parameters": {"weight": 1.0}},
                      {"model": str(fam["sft"]), "parameters": {"weight": 1.0}}]}
    kw = config_to_kwargs({**doc, "tokenizer_source": "union"})
    assert kw["tokenizer_source"] == "union"
    kw = config_to_kwargs({**doc, "tokenizer": {"source": str(fam["ct"]), "pad_to_multiple_of": 64},
                           "config_from": str(fam["sft"])})
    assert kw["tokenizer_source"] == str(fam["ct"]) and kw["pad_to_multiple_of"] == 64
    assert kw["config_from"] == str(fam["sft"])
    assert config_to_kwargs({**doc, "tokenizer": {}})["tokenizer_source"] == "union"
    with pytest.raises(ParameterError, match="not both"):
        config_to_kwargs({**doc, "tokenizer": {"source": "base"}, "tokenizer_source": "base"})
    with pytest.raises(ParameterError, match="tokens"):
        config_to_kwargs({**doc, "tokenizer": {"tokens": {"<x>": {"source": "base"}}}})
    import yaml
    from fastmerge.cli import main
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({**doc, "tokenizer_source": str(fam["ct"])}))
    assert main(["merge", str(cfg), str(tmp_path / "o"), "--no-progress", "--backend", "torch",
                 "--config-from", "base"]) == 0
    out = tmp_path / "o"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == fam["ct_tokens"]
    assert json.loads((out / "tokenizer.json").read_text()) == \
        json.loads((fam["ct"] / "tokenizer.json").read_text())


# -- bad input -------------------------------------------------------------------------------

def test_different_shapes_without_alignment_say_how_to_align(fam):
    with pytest.raises(InputError, match="tokenizer_source='union'"):
        fastmerge.merge(fam["base"], [fam["ct"]], method="ties", progress=False)


def test_conflicting_special_roles_are_refused(fam, tmp_path):
    d = tmp_path / "ct-bad"
    shutil.copytree(fam["ct"], d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["bos_token"], tc["eos_token"] = "</s>", "<s>"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(InputError, match="token '</s>' is the eos_token of .*base's tokenizer "
                                         "but the bos_token of .*ct-bad's"):
        fastmerge.merge(fam["base"], [d], method="ties", tokenizer_source="union",
                        progress=False)
    d2 = tmp_path / "ct-special"
    shutil.copytree(fam["ct"], d2)
    doc = json.loads((d2 / "tokenizer.json").read_text())
    new = max(doc["model"]["vocab"], key=doc["model"]["vocab"].get)
    doc["added_tokens"].append({"id": doc["model"]["vocab"][new], "content": new,
                                "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False, "special": True})
    (d2 / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="special token in .* but an ordinary one"):
        fastmerge.merge(fam["base"], [d2, fam["ct"]], method="ties", tokenizer_source="union",
                        progress=False)


def test_tokenizer_larger_than_embedding_and_missing_tokenizer(fam, tmp_path):
    d = tmp_path / "small-rows"
    shutil.copytree(fam["ct"], d)
    cfg = json.loads((d / "config.json").read_text())
    sd = load(d)
    for name in VOCAB:
        sd[name] = sd[name][:-5].contiguous()
    from safetensors.torch import save_file
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] - 5}))
    with pytest.raises(InputError, match="5 token.* at or past the .* rows of its embedding"):
        fastmerge.merge(fam["base"], [d], method="ties", tokenizer_source="union",
                        progress=False)
    e = tmp_path / "no-tok"
    shutil.copytree(fam["ct"], e)
    (e / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="no tokenizer files"):
        fastmerge.merge(fam["base"], [e], method="ties", tokenizer_source="union",
                        progress=False)


def test_padding_rows_beyond_the_tokenizer_are_dropped(fam, tmp_path):
    """An embedding with more rows than its tokenizer has ids (padding): those rows belong
    to no token and are left out."""
    d = tmp_path / "padded"
    shutil.copytree(fam["ct"], d)
    cfg = json.loads((d / "config.json").read_text())
    sd = load(d)
    for name in VOCAB:
        sd[name] = torch.cat([sd[name], torch.zeros(8, sd[name].shape[1], dtype=sd[name].dtype)])
    from safetensors.torch import save_file
    save_file(sd, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 8}))
    kw = dict(method="ties", density=0.5, tokenizer_source="union", backend="torch",
              progress=False)
    a, rep = fastmerge.merge(fam["base"], [d], **kw)
    b, _ = fastmerge.merge(fam["base"], [fam["ct"]], **kw)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert rep["vocabulary"]["rows_without_token"] == [{"model": str(d), "rows": 8}]


def test_bad_parameters(fam):
    with pytest.raises(ParameterError, match="tokenizer_source"):
        fastmerge.merge(fam["base"], [fam["ct"]], tokenizer_source="both", progress=False)
    with pytest.raises(ParameterError, match="pad_to_multiple_of needs"):
        fastmerge.merge(fam["base"], [fam["ct"]], pad_to_multiple_of=64, progress=False)
    with pytest.raises(ParameterError, match="config_from"):
        fastmerge.merge(fam["base"], [fam["ct"]], config_from="./nowhere", progress=False)


def test_config_from_a_model_whose_special_tokens_the_output_lacks(fam, tmp_path):
    with pytest.raises(InputError, match="eos_token '<\\|im_end\\|>' is not in the output"):
        fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], method="ties",
                        tokenizer_source=0, config_from=1, output=tmp_path / "o",
                        backend="torch", progress=False)
    assert not any(tmp_path.iterdir())          # refused before anything was merged


def _sp_model(tokens, special) -> bytes:
    """A SentencePiece ModelProto holding just ``tokens`` (types: 3 control, 1 normal)."""
    import struct

    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out
    data = b""
    for t in tokens:
        text = t.encode()
        body = b"\x0a" + varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0)
        body += b"\x18" + bytes([3 if t in special else 1])
        data += b"\x0a" + varint(len(body)) + body
    return data


def test_sentencepiece_only_base(fam, tmp_path):
    """A base with only tokenizer.model: its pieces are its tokens."""
    d = tmp_path / "base-sp"
    shutil.copytree(fam["base"], d)
    doc = json.loads((d / "tokenizer.json").read_text())
    tokens = sorted(doc["model"]["vocab"], key=doc["model"]["vocab"].get)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(_sp_model(tokens, {"<unk>", "<s>", "</s>"}))
    kw = dict(method="ties", density=0.5, tokenizer_source="union", backend="torch",
              progress=False)
    a, _ = fastmerge.merge(d, [fam["ct"]], **kw)
    b, _ = fastmerge.merge(fam["base"], [fam["ct"]], **kw)
    assert all(torch.equal(a[k], b[k]) for k in b)
    out = fastmerge.merge(d, [fam["ct"]], output=tmp_path / "o", **kw)
    assert (out.path / "tokenizer.json").read_bytes() == (fam["ct"] / "tokenizer.json").read_bytes()


def test_sentencepiece_model_is_read():
    from fastmerge.vocab import sentencepiece_pieces
    import struct
    import tempfile
    from pathlib import Path

    def piece(text, kind=None):
        body = b"\x0a" + bytes([len(text.encode())]) + text.encode() + b"\x15" + struct.pack("<f", 0.0)
        if kind is not None:
            body += b"\x18" + bytes([kind])
        return b"\x0a" + bytes([len(body)]) + body
    data = piece("<unk>", 2) + piece("<s>", 3) + piece("</s>", 3) + piece("▁a") + piece("b")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "tokenizer.model"
        p.write_bytes(data + b"\x12\x02\x08\x01")      # a trainer_spec field, skipped
        assert sentencepiece_pieces(p) == [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("▁a", 1),
                                           ("b", 1)]
        p.write_bytes(data[:-3])
        with pytest.raises(InputError, match="SentencePiece"):
            sentencepiece_pieces(p)


def test_linear_and_tied_embeddings(tmp_path):
    """linear (no base: model 0's vocabulary is the reference) and a checkpoint with tied
    embeddings (no lm_head): the rows every model has are the same merge, rows one model
    has are its own."""
    from fastmerge.testing import llama_config
    f = write_extended_vocab_family(tmp_path, llama_config(tie_word_embeddings=True),
                                    new_tokens=16)
    V = f["config"]["vocab_size"]
    got, rep = fastmerge.merge(None, [f["sft"], f["ct"]], method="linear", weights=[0.3, 0.7],
                               tokenizer_source="union", backend="c", progress=False)
    assert "lm_head.weight" not in got
    base, models = truncated(f, names=("sft", "ct"))
    want, _ = fastmerge.merge(None, models, method="linear", weights=[0.3, 0.7], backend="c",
                              progress=False)
    ct, sft = load(f["ct"]), load(f["sft"])
    name = VOCAB[0]
    assert torch.equal(got[name][:V], want[name])
    # union: model 0's vocabulary (the base's and the chat tokens) is the reference
    assert torch.equal(got[name][V:V + 2], sft[name][V:])
    assert torch.equal(got[name][V + 2:], ct[name][V:])
    assert rep["vocabulary"]["tensors"] == [{"name": name, "merged": V, "averaged": 0,
                                             "copied": 18, "padding": 0}]


def test_demo_extended_vocab(capsys):
    from fastmerge.cli import main
    assert main(["demo", "--extended-vocab", "--backend", "torch", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: union, 322 tokens, 322 rows" in out
    assert "model.embed_tokens.weight: rows 256 merged, 66 copied" in out


def test_interrupted_aligned_merge_resumes_byte_identical(fam, tmp_path, monkeypatch):
    """Resume keeps the vocabulary in its fingerprint: another source is refused, the same
    one continues to the bytes of an uninterrupted run."""
    from fastmerge.errors import OutputError
    from tests.checks import interrupt_at_shard
    kw = dict(method="ties", density=0.5, tokenizer_source="union", backend="torch",
              progress=False, shard_size=40_000)
    ref = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], output=tmp_path / "ref", **kw)
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        interrupt_at_shard(m, 2)
        with pytest.raises(KeyboardInterrupt):
            fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], output=out, **kw)
    with pytest.raises(OutputError, match="different vocabulary"):
        fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], output=out, resume=True,
                        **{**kw, "tokenizer_source": "base"})
    got = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], output=out, resume=True, **kw)
    assert got.shards_resumed == 2
    for f in sorted(ref.path.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_factory_extended_family(fam):
    """The CT vocabulary extends the base's as a prefix and splits script text into its new
    tokens; the SFT adds the chat tokens as special tokens; perm is a permutation."""
    from tokenizers import Tokenizer
    from fastmerge.testing import pseudo_text, _SCRIPT
    from fastmerge.vocab import read_vocab
    from fastmerge.io import Checkpoint
    V = fam["config"]["vocab_size"]
    v = {n: read_vocab(Checkpoint.open(fam[n])) for n in ("base", "ct", "sft", "perm")}
    assert len(v["base"].tokens) == V and v["ct"].tokens[:V] == v["base"].tokens
    assert len(v["ct"].tokens) == V + NEW
    ids = Tokenizer.from_file(str(fam["ct"] / "tokenizer.json")).encode(
        " ".join(pseudo_text(_SCRIPT, 20, 5))).ids
    assert sum(i >= V for i in ids) > 0.8 * len(ids)
    assert v["sft"].tokens[V:] == list(CHAT_TOKENS) and set(CHAT_TOKENS) <= v["sft"].special
    assert sorted(v["perm"].tokens) == sorted(v["base"].tokens)
    perm = fam["permutation"]
    assert all(v["perm"].tokens[int(perm[i])] == t for i, t in enumerate(v["base"].tokens))
    assert load(fam["ct"])[VOCAB[0]].shape[0] == V + NEW


@pytest.mark.parametrize("backend", ["torch", "c"])
def test_rows_the_base_lacks_are_the_weighted_mean(fam, tmp_path, backend):
    """Two models with the same new tokens: their rows are Σ w_i θ_i / Σ w_i, in fp64,
    rounded once."""
    backend_ok(backend)
    from safetensors.torch import save_file
    from fastmerge.reference import round_once
    V = fam["config"]["vocab_size"]
    d = tmp_path / "ct2"
    shutil.copytree(fam["ct"], d)
    sd = load(d)
    g = torch.Generator().manual_seed(1)
    for name in VOCAB:
        sd[name][V:] = (sd[name][V:].float() + 0.01 * torch.randn(NEW, sd[name].shape[1],
                                                                  generator=g)).half()
    save_file(sd, d / "model.safetensors")
    w = [0.3, 0.9]
    got, rep = fastmerge.merge(fam["base"], [fam["ct"], d], method="ties", density=0.5,
                               weights=w, tokenizer_source="union", backend=backend,
                               progress=False)
    ct = load(fam["ct"])
    for name in VOCAB:
        a, b = ct[name][V:].double(), sd[name][V:].double()
        want = round_once((0.0 + w[0] * a + w[1] * b) / (w[0] + w[1]), torch.float16)
        assert torch.equal(got[name][V:], want), name
    assert rep["vocabulary"]["tensors"][0]["averaged"] == NEW


def test_nonfinite_new_rows_stop_the_merge(fam, tmp_path):
    from safetensors.torch import save_file
    V = fam["config"]["vocab_size"]
    d = tmp_path / "ct-nan"
    shutil.copytree(fam["ct"], d)
    sd = load(d)
    sd[VOCAB[1]][V + 3, 5] = float("nan")
    sd[VOCAB[1]][V + 4, 0] = float("inf")
    save_file(sd, d / "model.safetensors")
    kw = dict(method="ties", density=0.5, tokenizer_source="union", backend="c", progress=False)
    with pytest.raises(InputError, match="tensor 'lm_head.weight': 2 non-finite .*ct-nan"):
        fastmerge.merge(fam["base"], [d], **kw)
    got, _ = fastmerge.merge(fam["base"], [d], allow_nonfinite=True, **kw)
    assert torch.equal(got[VOCAB[1]][V:].view(torch.int16), sd[VOCAB[1]][V:].view(torch.int16))


@pytest.mark.interpreter
@pytest.mark.parametrize("source", ["base", 0])
def test_triton_base_and_model_sources_match_the_c_backend(fam, source):
    """The Triton backend merges the aligned rows as the C backend does, bit for bit (a
    method without thresholds: the interpreter is slow)."""
    backend_ok("triton")
    backend_ok("c")
    kw = dict(method="task_arithmetic", weights=[0.6, 0.5], tokenizer_source=source,
              device="cpu", progress=False)
    a, ra = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], backend="triton", **kw)
    b, rb = fastmerge.merge(fam["base"], [fam["ct"], fam["sft"]], backend="c", **kw)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert ra["vocabulary"] == rb["vocabulary"]


@pytest.mark.parametrize("method,kw", [("ties_sv", dict(density=0.3, slack=0.05)),
                                       ("dare_ties", dict(density=0.5, seed=1)),
                                       ("della_linear", dict(density=0.5, epsilon=0.2)),
                                       ("model_stock", {}),
                                       ("nuslerp", dict(weights=[1, 2], vectors="columns"))],
                         ids=["ties_sv", "dare_ties", "della_linear", "model_stock",
                              "nuslerp-columns"])
def test_row_chunks_do_not_change_the_result(fam, monkeypatch, method, kw):
    """Rows gathered in chunks of 7 rows (runs split across chunks, DARE's entry index
    carried per chunk, radix select over many chunks) give the result of rows held in
    memory (the shared rows gathered once and bracketed)."""
    from fastmerge import pipeline
    from fastmerge.backends import c_backend
    backend_ok("c")
    args = (fam["base"], [fam["ct"], fam["perm"]])
    kw = dict(method=method, tokenizer_source="union", backend="c", progress=False, **kw)
    a, ra = fastmerge.merge(*args, **kw)
    monkeypatch.setattr(pipeline, "DEFAULT_CHUNK_ELEMS", 7 * 64)
    monkeypatch.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
    monkeypatch.setattr(c_backend, "CHUNK_ELEMS", 7 * 64, raising=False)
    b, rb = fastmerge.merge(*args, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra["tensors"] == rb["tensors"]

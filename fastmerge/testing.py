"""Synthetic Llama-shaped checkpoint families for tests, the demo and the benchmarks.

No model hub is needed: this module writes a *base* model and ``n`` fine-tuned models
as ordinary Hugging Face model folders (``config.json``, ``generation_config.json``, a
tiny working tokenizer, safetensors weights, sharded like ``save_pretrained`` does),
which ``transformers.AutoModelForCausalLM.from_pretrained`` loads and runs.

    from fastmerge.testing import PRESETS, write_llama_family, state_dicts
    paths = write_llama_family("/tmp/fam", config=PRESETS["tiny"], n_models=2)
    paths["base"], paths["models"]      # Path('/tmp/fam/base'), [.../ct, .../sft]
    base_sd, (ct_sd, sft_sd) = state_dicts(config=PRESETS["tiny"], n_models=2)

    python -m fastmerge.testing --preset 1b --out DIR [--n-models 2] [--dtype float16]
                                [--shard-size 5GB] [--seed 0]

How the weights are made (all in fp32 per chunk, then rounded to ``dtype``):

* base: ``N(0, 0.02)`` for every matrix (HF's ``initializer_range``), ``1 + N(0, 0.05)``
  for the RMSNorm weights.
* task vector of model ``i`` (``τ_i = θ_i − θ_b``), per entry::

      |τ_i| = scale_i · (overlap · |S| + (1 − overlap) · |P_i|) / c
      S = z_s·|z_s|^(tail−1),  P_i = z_i·|z_i|^(tail−1),  z ~ N(0, 1)

  ``S`` is shared by all models, ``P_i`` is model ``i``'s own; ``tail > 1`` makes the
  magnitudes heavy-tailed (many small entries, a few large ones) and ``c`` normalises
  the mixture to unit RMS, so ``scale_i`` is (before rounding) the RMS of ``τ_i``.
  The sign is the shared sign of ``S`` except on a random ``conflict`` fraction of the
  entries, where the models get signs that do not all agree. A random ``zeros``
  fraction of each model's entries is exactly unchanged (``τ = 0``); rounding to fp16 /
  bf16 adds more exact zeros where ``|τ|`` is below half an ulp of the base weight, as
  in real fine-tunes. The RMSNorm weights get ``NORM_TV_MULT`` times larger τ.
* default scales: the first model ("ct", continual pre-training) has a τ three times
  larger than the second ("sft"), the situation of the TIES-SV paper.

Generation is chunked (``CHUNK`` elements) and every chunk has its own generators,
seeded from ``(seed, tensor name, chunk index, role)`` by a hash, so the values do not
depend on the order of generation, the memory never holds more than a few chunks, and
the same seed gives byte-identical files. The safetensors files are written chunk by
chunk as the values are made (``fastmerge.io.safetensors_file.SafetensorsWriter``, the
merge output's writer; shards planned by ``fastmerge.output.plan_shards``, sizes read by
``fastmerge.output.parse_size``), so the 1b and 7b presets are written with a few
hundred MB of memory.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .io.safetensors_file import SafetensorsWriter
from .output import parse_size, plan_shards, shard_name

__all__ = ["PRESETS", "llama_config", "llama_tensor_specs", "write_llama_family",
           "state_dicts", "family_tensors", "CHUNK", "DEFAULT_NAMES", "default_tv_scales"]

#: elements generated at once; part of the definition of the values (seeding is per chunk)
CHUNK = 1 << 21
#: RMSNorm weights sit near 1 (fp16 ulp ~1e-3): their task vectors are this much larger
NORM_TV_MULT = 10.0
BASE_STD = 0.02
NORM_STD = 0.05
DEFAULT_NAMES = ("base", "ct", "sft")

_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
_DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


# -- configs -----------------------------------------------------------------------------

def llama_config(hidden_size: int = 64, intermediate_size: int = 172,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 num_key_value_heads: int = 2, vocab_size: int = 256,
                 tie_word_embeddings: bool = False, **overrides) -> dict:
    """A ``config.json`` dict for ``LlamaForCausalLM`` (valid for transformers 4.x and 5.x).

    ``overrides`` replace or add keys (``max_position_embeddings``, ``rms_norm_eps``,
    ``rope_theta``, ``torch_dtype``, ``head_dim``...)."""
    if hidden_size % num_attention_heads and "head_dim" not in overrides:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of "
                         f"num_attention_heads {num_attention_heads}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {num_key_value_heads}")
    rope_theta = float(overrides.pop("rope_theta", 10000.0))
    dtype = overrides.pop("dtype", overrides.pop("torch_dtype", "float16"))
    if isinstance(dtype, torch.dtype):
        dtype = _DTYPE_NAME[dtype]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": hidden_size // num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": BASE_STD,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        # transformers 4.x reads rope_theta / rope_scaling, 5.x rope_parameters
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": bool(tie_word_embeddings),
        # transformers 4.x reads torch_dtype, 5.x dtype
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    cfg.update(overrides)
    return cfg


PRESETS: dict[str, dict] = {
    # ~124k parameters: unit tests
    "tiny": llama_config(),
    # ~27M parameters: quick benchmarks, the demo
    "small": llama_config(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=4096),
    # TinyLlama-1.1B shape: 1,100,048,384 parameters
    "1b": llama_config(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                       max_position_embeddings=2048),
    # Llama-2-7B shape: 6,738,415,616 parameters
    "7b": llama_config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096),
}


def _resolve_config(config) -> dict:
    if config is None:
        config = "tiny"
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown preset {config!r}; choose from {', '.join(PRESETS)}")
        config = PRESETS[config]
    return copy.deepcopy(dict(config))


def llama_tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, shape), ...]`` of a ``LlamaForCausalLM`` state dict, in HF's order."""
    c = _resolve_config(config)
    h, inter, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    hd = c.get("head_dim") or h // nh
    specs = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "self_attn.q_proj.weight", (nh * hd, h)),
                  (p + "self_attn.k_proj.weight", (nkv * hd, h)),
                  (p + "self_attn.v_proj.weight", (nkv * hd, h)),
                  (p + "self_attn.o_proj.weight", (h, nh * hd)),
                  (p + "mlp.gate_proj.weight", (inter, h)),
                  (p + "mlp.up_proj.weight", (inter, h)),
                  (p + "mlp.down_proj.weight", (h, inter)),
                  (p + "input_layernorm.weight", (h,)),
                  (p + "post_attention_layernorm.weight", (h,))]
    specs.append(("model.norm.weight", (h,)))
    if not c.get("tie_word_embeddings", False):
        specs.append(("lm_head.weight", (c["vocab_size"], h)))
    return specs


def n_params(config) -> int:
    return sum(math.prod(s) for _, s in llama_tensor_specs(config))


# -- generation --------------------------------------------------------------------------

def default_tv_scales(n_models: int) -> list[float]:
    """RMS of each model's task vector: "ct" 3e-3, "sft" 1e-3, further models 1.25e-3, 1.5e-3..."""
    return [3e-3 if i == 0 else 1e-3 * (1 + 0.25 * (i - 1)) for i in range(n_models)]


def _abs_moment(q: float) -> float:
    """E|z|^q for z ~ N(0, 1)."""
    return 2 ** (q / 2) * math.gamma((q + 1) / 2) / math.sqrt(math.pi)


def _seed(seed: int, name: str, chunk: int, role: str) -> int:
    h = hashlib.blake2b(f"fastmerge.testing/{seed}/{name}/{chunk}/{role}".encode(),
                        digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class _Recipe:
    """Everything that defines the values; ``chunk()`` makes one chunk of every model."""

    def __init__(self, n_models, dtype, seed, tv_scales, overlap, conflict, zeros, tail):
        self.n, self.dtype, self.seed = int(n_models), dtype, int(seed)
        if self.n < 0:
            raise ValueError("n_models must be >= 0")
        scales = default_tv_scales(self.n) if tv_scales is None else [float(s) for s in tv_scales]
        if len(scales) != self.n or any(s < 0 for s in scales):
            raise ValueError(f"tv_scales needs {self.n} non-negative values, got {tv_scales!r}")
        for label, v in (("overlap", overlap), ("conflict", conflict), ("zeros", zeros)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {v!r}")
        if tail < 1:
            raise ValueError(f"tail must be >= 1, got {tail!r}")
        self.scales, self.tail = scales, float(tail)
        self.overlap, self.conflict, self.zeros = float(overlap), float(conflict), float(zeros)
        o, p = self.overlap, self.tail
        m1, m2 = _abs_moment(p), _abs_moment(2 * p)
        self.norm = math.sqrt(o * o * m2 + (1 - o) ** 2 * m2 + 2 * o * (1 - o) * m1 * m1)

    def _magnitude_(self, z: torch.Tensor) -> torch.Tensor:
        """|z|^tail, in place."""
        z.abs_()
        if self.tail == 2.0:
            return z.mul_(z)
        if self.tail != 1.0:
            z.pow_(self.tail)
        return z

    def chunk(self, name: str, c: int, n: int) -> list[torch.Tensor]:
        """Chunk ``c`` (``n`` elements) of tensor ``name``: ``[base, model_1, ...]`` in dtype."""
        is_norm = name.endswith("norm.weight")
        g = torch.Generator().manual_seed(_seed(self.seed, name, c, "base"))
        b = torch.empty(n).normal_(generator=g)
        if is_norm:
            b.mul_(NORM_STD).add_(1.0)
        else:
            b.mul_(BASE_STD)
        base = b.to(self.dtype)
        out = [base]
        if self.n == 0:
            return out
        b32 = base.float() if self.dtype != torch.float32 else base
        del b
        # shared component: magnitude |S| (weighted by overlap), sign sigma, conflict mask
        g = torch.Generator().manual_seed(_seed(self.seed, name, c, "shared"))
        zs = torch.empty(n).normal_(generator=g)
        uc = torch.empty(n).uniform_(generator=g)
        sigma = torch.sign(zs)
        shared = self._magnitude_(zs).mul_(self.overlap)
        conf = uc < self.conflict if self.n > 1 and self.conflict > 0 else None
        mags, flips, drops = [], [], []
        for i in range(self.n):
            g = torch.Generator().manual_seed(_seed(self.seed, name, c, f"model{i}"))
            z = torch.empty(n).normal_(generator=g)
            u = torch.empty(n).uniform_(generator=g)
            if conf is not None:
                flips.append(torch.lt(z, 0).logical_and_(conf))  # sign bit, independent of |z|
            drops.append(torch.lt(u, self.zeros))
            del u
            mags.append(torch.add(shared, self._magnitude_(z), alpha=1.0 - self.overlap))
        del shared, zs
        if conf is not None:
            # conflict entries: model i has sign -sigma where its own sign bit is set; where
            # the bits happen to agree for every model, one model (a uniform choice, from
            # uc) is flipped, so that on every conflict entry the models disagree
            n_flipped = torch.zeros(n, dtype=torch.uint8)
            for f in flips:
                n_flipped.add_(f)
            same = (n_flipped == 0).logical_or_(n_flipped == self.n).logical_and_(conf)
            k = uc.mul_(self.n / self.conflict).clamp_(max=self.n - 1).to(torch.uint8)
            for i in range(self.n):
                flips[i].logical_xor_(torch.eq(k, i).logical_and_(same))
            del n_flipped, same, k
        mult = NORM_TV_MULT if is_norm else 1.0
        for i in range(self.n):
            sign = torch.where(flips[i], -sigma, sigma) if conf is not None else sigma.clone()
            sign.masked_fill_(drops[i], 0.0)
            theta = torch.addcmul(b32, mags[i], sign, value=self.scales[i] * mult / self.norm)
            out.append(theta.to(self.dtype))
            mags[i] = None
        return out


def _chunks(numel: int) -> list[tuple[int, int]]:
    return [(s, min(CHUNK, numel - s)) for s in range(0, numel, CHUNK)]


def family_tensors(config=None, n_models: int = 2, dtype=torch.float16, seed: int = 0,
                   tv_scales=None, overlap: float = 0.5, conflict: float = 0.3,
                   zeros: float = 0.05, tail: float = 3.0, workers: int | None = None,
                   ) -> Iterator[tuple[str, tuple[int, ...], int, list[torch.Tensor]]]:
    """Stream ``(name, shape, start, [base_chunk, model_chunks...])``, tensor by tensor,
    chunk by chunk (flat 1-D chunks in dtype). ``workers`` threads generate ahead
    (default: 2), at most ``2 * workers`` chunks in flight."""
    dtype = _as_dtype(dtype)
    recipe = _Recipe(n_models, dtype, seed, tv_scales, overlap, conflict, zeros, tail)
    jobs = [(name, tuple(shape), c, s, n)
            for name, shape in llama_tensor_specs(config)
            for c, (s, n) in enumerate(_chunks(math.prod(shape)))]
    workers = 2 if workers is None else max(1, int(workers))
    if workers == 1:
        for name, shape, c, s, n in jobs:
            yield name, shape, s, recipe.chunk(name, c, n)
        return
    ahead = 2 * workers
    with ThreadPoolExecutor(workers, thread_name_prefix="fastmerge-testing") as pool:
        pending = []
        it = iter(jobs)
        for job in it:
            pending.append((job, pool.submit(recipe.chunk, job[0], job[2], job[4])))
            if len(pending) >= ahead:
                break
        while pending:
            (name, shape, c, s, n), fut = pending.pop(0)
            result = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(recipe.chunk, nxt[0], nxt[2], nxt[4])))
            yield name, shape, s, result


def state_dicts(config=None, n_models: int = 2, dtype=torch.float16, seed: int = 0,
                **kwargs) -> tuple[dict, list[dict]]:
    """In-memory family (small configs only): ``(base_sd, [model_sd, ...])``, with the
    same values ``write_llama_family`` writes for the same arguments."""
    dtype = _as_dtype(dtype)
    sds = [dict() for _ in range(n_models + 1)]
    for name, shape, start, parts in family_tensors(config, n_models, dtype, seed, **kwargs):
        for sd, part in zip(sds, parts):
            if name not in sd:
                sd[name] = torch.empty(math.prod(shape), dtype=dtype)
            sd[name][start:start + part.numel()] = part
    specs = dict(llama_tensor_specs(config))
    sds = [{n: t.view(specs[n]) for n, t in sd.items()} for sd in sds]
    return sds[0], sds[1:]


# -- safetensors, streaming --------------------------------------------------------------

def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.lower().replace("torch.", ""))
    if dtype not in _DTYPE_NAME:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    return dtype


class _FolderWriter:
    """The weights of one model folder: tensors arrive in spec order, chunk by chunk, and
    go straight into the shard files (one SafetensorsWriter at a time), sharded like
    ``save_pretrained`` (one shard: ``model.safetensors``, no index)."""

    def __init__(self, directory: Path, specs, dtype: torch.dtype, shard_size: int | None):
        self.dir = directory
        self.dtype = dtype
        self.shards = plan_shards(list(specs), shard_size,
                                  nbytes=lambda spec: math.prod(spec[1]) * dtype.itemsize)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [shard_name(i, n) for i in range(n)]
        self.shard_of = {name: i for i, shard in enumerate(self.shards) for name, _ in shard}
        self.total = sum(math.prod(shape) for shard in self.shards
                         for _, shape in shard) * dtype.itemsize
        self._i, self._w = -1, None
        for stale in list(directory.glob("model*.safetensors")) + \
                [directory / "model.safetensors.index.json"]:
            if stale.exists():
                stale.unlink()

    def _open(self, i: int) -> None:
        self._close_current()
        self._i = i
        self._w = SafetensorsWriter(self.dir / self.files[i],
                                    [(name, self.dtype, shape) for name, shape in self.shards[i]],
                                    metadata={"format": "pt"})

    def _close_current(self) -> None:
        w, self._w = self._w, None
        if w is not None:
            w.close()  # checks that every byte the header declares arrived

    def write(self, name: str, data: torch.Tensor) -> None:
        i = self.shard_of[name]
        if i != self._i:
            self._open(i)
        self._w.write(data)

    def close(self) -> None:
        self._close_current()
        if self._i != len(self.shards) - 1:
            raise RuntimeError(f"{self.dir}: only {self._i + 1} of {len(self.shards)} shards")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {name: self.files[self.shard_of[name]]
                                    for shard in self.shards for name, _ in shard}}
            (self.dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Stop; the shard being written is removed."""
        w, self._w = self._w, None
        if w is not None:
            w.abort()


# -- tokenizer and folder files ----------------------------------------------------------

_MERGES = [("▁", "t"), ("h", "e"), ("▁", "a"), ("i", "n"), ("▁t", "he"), ("e", "r"),
           ("a", "n"), ("o", "n"), ("r", "e"), ("▁", "s"), ("e", "n"), ("▁", "o"),
           ("a", "t"), ("o", "r"), ("e", "s"), ("▁", "w"), ("i", "s"), ("▁", "i"),
           ("e", "d"), ("▁", "b")]


def _tokenizer_json(vocab_size: int) -> str:
    """A character-level BPE with a few merges, Metaspace like Llama's; ids < vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = ["<unk>", "<s>", "</s>", "▁"]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    tokens += [chr(c) for c in range(ord("0"), ord("9") + 1)]
    tokens += [chr(c) for c in range(33, 127) if not chr(c).isalnum()]
    tokens = tokens[:vocab_size]
    merges = []
    for a, b in _MERGES:
        if len(tokens) >= vocab_size:
            break
        if a in tokens and b in tokens and a + b not in tokens:
            tokens.append(a + b)
            merges.append((a, b))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok.to_str(pretty=True)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_folder_files(directory: Path, config: dict) -> None:
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json",
                {"bos_token_id": config.get("bos_token_id", 1),
                 "eos_token_id": config.get("eos_token_id", 2),
                 "max_length": config.get("max_position_embeddings", 2048)})
    (directory / "tokenizer.json").write_text(_tokenizer_json(config["vocab_size"]) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(directory / "tokenizer_config.json",
                {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                 "add_bos_token": True, "add_eos_token": False,
                 "clean_up_tokenization_spaces": False,
                 "model_max_length": config.get("max_position_embeddings", 2048)})
    _write_json(directory / "special_tokens_map.json", specials)


# -- the family --------------------------------------------------------------------------

def write_llama_family(root, config=None, dtype=torch.float16, n_models: int = 2,
                       seed: int = 0, shard_size=None, names: Sequence[str] | None = None,
                       tv_scales: Sequence[float] | None = None, overlap: float = 0.5,
                       conflict: float = 0.3, zeros: float = 0.05, tail: float = 3.0,
                       workers: int | None = None) -> dict:
    """Write ``root/<names[0]>`` (the base) and ``root/<names[i]>`` (the fine-tunes).

    ``config``: a ``llama_config`` dict or a preset name (default "tiny").
    ``shard_size``: bytes (or "5GB"); ``None`` writes one ``model.safetensors``; with a
    size, shards ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    (one shard only -> ``model.safetensors``, as ``save_pretrained`` does).
    ``names``: folder names, base first (default ``base, ct, sft``, then ``model3``...).
    ``tv_scales``: RMS of each model's task vector (default ``default_tv_scales``).
    ``overlap``: weight of the shared component in the magnitudes (0: independent,
    1: the same magnitudes up to scale). ``conflict``: fraction of the entries where the
    models' signs disagree. ``zeros``: fraction of each model's entries left unchanged.
    ``tail``: magnitude exponent (1: Gaussian magnitudes, default 3: kurtosis ~20).

    Returns ``{"base": Path, "models": [Path, ...], "names": [...], "config": dict}``.
    """
    dtype = _as_dtype(dtype)
    cfg = _resolve_config(config)
    cfg["torch_dtype"] = cfg["dtype"] = _DTYPE_NAME[dtype]
    names = list(names) if names is not None else list(DEFAULT_NAMES)
    names += [f"model{i}" for i in range(len(names), n_models + 1)]
    names = names[:n_models + 1]
    if len(set(names)) != len(names):
        raise ValueError(f"names must be distinct, got {names}")
    shard_bytes = None if shard_size is None else parse_size(shard_size)  # > 0 or ValueError
    root = Path(root)
    dirs = [root / n for n in names]
    specs = llama_tensor_specs(cfg)
    writers = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        _write_folder_files(d, cfg)
        writers.append(_FolderWriter(d, specs, dtype, shard_bytes))
    try:
        for name, _, _, parts in family_tensors(cfg, n_models, dtype, seed, tv_scales=tv_scales,
                                                overlap=overlap, conflict=conflict,
                                                zeros=zeros, tail=tail, workers=workers):
            for w, part in zip(writers, parts):
                w.write(name, part)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return {"base": dirs[0], "models": dirs[1:], "names": names, "config": cfg}


# -- command line ------------------------------------------------------------------------

def _peak_rss_mb() -> float | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # pragma: no cover - not on every platform
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmerge.testing",
                                 description="Write a synthetic Llama base + fine-tunes family.")
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--out", required=True, help="folder; one sub-folder per model")
    ap.add_argument("--n-models", type=int, default=2)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--shard-size", default=None, help="e.g. 5GB; default one file per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--names", default=None, help="comma-separated folder names, base first")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = write_llama_family(args.out, config=args.preset, dtype=args.dtype,
                               n_models=args.n_models, seed=args.seed,
                               shard_size=args.shard_size,
                               names=args.names.split(",") if args.names else None)
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for d in [paths["base"], *paths["models"]] for f in d.iterdir())
    print(f"base:   {paths['base']}")
    for p in paths["models"]:
        print(f"model:  {p}")
    rss = _peak_rss_mb()
    print(f"preset {args.preset} ({n_params(args.preset):,} parameters, {args.dtype}), "
          f"{1 + args.n_models} models, {size / 1e9:.2f} GB written in {dt:.1f} s"
          + (f", peak RSS {rss:.0f} MB" if rss else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- extended vocabularies (docs/spec.md §13) ---------------------------------------------

#: the second script of the CT model: Tibetan letters (U+0F40..U+0F6C) and vowel signs
_SCRIPT = [chr(c) for c in range(0x0F40, 0x0F6D) if chr(c).isprintable()] + \
          [chr(c) for c in range(0x0F71, 0x0F7E)]
_LATIN = [chr(c) for c in range(ord("a"), ord("z") + 1)]
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def pseudo_text(alphabet, n_words: int, seed: int) -> list[str]:
    """Lines of random words (2-9 letters, a few letters more frequent than others)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.linspace(3.0, 1.0, len(alphabet))
    letters = torch.multinomial(weights, n_words * 9, replacement=True, generator=g).tolist()
    lengths = torch.randint(2, 10, (n_words,), generator=g).tolist()
    words, k = [], 0
    for n in lengths:
        words.append("".join(alphabet[i] for i in letters[k:k + n]))
        k += n
    return [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]


def _train_bpe(lines, vocab_size: int, alphabet, special=()) -> dict:
    """A BPE tokenizer.json (Metaspace, like Llama's) trained with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=list(alphabet) + ["▁"], show_progress=False,
                                  min_frequency=1)
    tok.train_from_iterator(lines, trainer)
    return json.loads(tok.to_str())


def base_tokenizer_json(vocab_size: int, seed: int = 0) -> dict:
    """A Llama-like base tokenizer with exactly ``vocab_size`` ids: ``<unk> <s> </s>``,
    then BPE tokens trained on Latin pseudo-words (filler tokens ``<extra_k>`` if the
    text runs out of merges)."""
    from tokenizers import Tokenizer, processors
    lines = pseudo_text(_LATIN, max(2000, vocab_size * 6), seed)
    doc = _train_bpe(lines, vocab_size, _LATIN, special=("<unk>", "<s>", "</s>"))
    vocab = doc["model"]["vocab"]
    k = 0
    while len(vocab) < vocab_size:
        vocab[f"<extra_{k}>"] = len(vocab)
        k += 1
    tok = Tokenizer.from_str(json.dumps(doc))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return json.loads(tok.to_str())


def extend_tokenizer_json(base: dict, new_tokens: int, seed: int = 0) -> dict:
    """The base tokenizer extended the way public CT models are: a BPE trained on text in
    a second script; its tokens the base lacks (the first ``new_tokens`` of them, in the
    trainer's order, which keeps every merge's parts) get the ids after the base's, and
    the merges that make them are appended to the base's merges."""
    lines = pseudo_text(_SCRIPT, max(2000, new_tokens * 8), seed + 1)
    trained = _train_bpe(lines, new_tokens + len(_SCRIPT) + 64, _SCRIPT)
    doc = copy.deepcopy(base)
    vocab = doc["model"]["vocab"]
    order = sorted(trained["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = [t for t, _ in order if t not in vocab][:new_tokens]
    if len(added) < new_tokens:
        raise ValueError(f"the script text gave only {len(added)} new tokens, not {new_tokens}")
    keep = set(added)
    for t in added:
        vocab[t] = len(vocab)
    for m in trained["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a + b in keep and a in vocab and b in vocab:
            doc["model"]["merges"].append(m if isinstance(m, str) else [a, b])
    return doc


def _folder_tokenizer(directory: Path, doc: dict, config: dict, chat: bool = False) -> None:
    (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
    specials = {"bos_token": "<s>", "eos_token": CHAT_TOKENS[1] if chat else "</s>",
                "unk_token": "<unk>"}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": True,
          "add_eos_token": False, "clean_up_tokenization_spaces": False,
          "model_max_length": config.get("max_position_embeddings", 2048)}
    if chat:
        tc["chat_template"] = CHAT_TEMPLATE
    _write_json(directory / "tokenizer_config.json", tc)
    _write_json(directory / "special_tokens_map.json", specials)


def _new_rows(name: str, seed: int, rows: int, width: int, dtype, role: str) -> Iterator:
    """Rows of a resized embedding: N(0, BASE_STD), in chunks of whole rows."""
    step = max(1, CHUNK // width)
    for k, r0 in enumerate(range(0, rows, step)):
        n = min(step, rows - r0)
        g = torch.Generator().manual_seed(_seed(seed, name, k, role))
        yield torch.empty(n * width).normal_(generator=g).mul_(BASE_STD).to(dtype)


def write_extended_vocab_family(root, config=None, dtype=torch.float16, seed: int = 0,
                                new_tokens: int = 64, chat_tokens: bool = True,
                                permuted: bool = False, shard_size=None,
                                workers: int | None = None) -> dict:
    """Base, an extended-vocabulary CT model and an SFT model (docs/spec.md §13 tests).

    The weights are ``write_llama_family``'s for the same config, dtype and seed. The
    base's tokenizer has ``vocab_size`` ids (``base_tokenizer_json``). ``ct``: the base's
    vocabulary extended by ``new_tokens`` tokens of a second script
    (``extend_tokenizer_json``), its embedding and lm_head resized with rows
    N(0, BASE_STD) for them. ``sft`` (``chat_tokens``): two chat special tokens
    (``CHAT_TOKENS``) added after the base's ids, rows resized likewise, its eos
    ``<|im_end|>`` and a chat template. ``perm`` (``permuted``; small configs, built in
    memory): the SFT model with the base's vocabulary permuted (ids shuffled, the
    embedding and lm_head rows shuffled alike; no chat tokens).

    Returns ``{"base", "ct", "sft", ["perm"]: Path, "config": dict, "ct_tokens": int,
    "permutation": LongTensor (perm's id of base token i)}``."""
    dtype = _as_dtype(dtype)
    cfg = _resolve_config(config)
    cfg["torch_dtype"] = cfg["dtype"] = _DTYPE_NAME[dtype]
    V, H = cfg["vocab_size"], cfg["hidden_size"]
    base_doc = base_tokenizer_json(V, seed)
    ct_doc = extend_tokenizer_json(base_doc, new_tokens, seed)
    extra = {"base": 0, "ct": new_tokens, "sft": len(CHAT_TOKENS) if chat_tokens else 0}
    sft_doc = copy.deepcopy(base_doc)
    if chat_tokens:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(json.dumps(sft_doc))
        tok.add_special_tokens(list(CHAT_TOKENS))
        sft_doc = json.loads(tok.to_str())
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    root = Path(root)
    names = ("base", "ct", "sft")
    dirs, writers, cfgs = {}, {}, {}
    vocab_names = {"model.embed_tokens.weight", "lm_head.weight"}
    for n in names:
        d = root / n
        d.mkdir(parents=True, exist_ok=True)
        c = dict(cfg, vocab_size=V + extra[n])
        _write_folder_files(d, c)
        _folder_tokenizer(d, {"base": base_doc, "ct": ct_doc, "sft": sft_doc}[n], c,
                          chat=(n == "sft" and chat_tokens))
        dirs[n], cfgs[n] = d, c
        writers[n] = _FolderWriter(d, llama_tensor_specs(c), dtype, shard_bytes)
    try:
        for name, shape, start, parts in family_tensors(cfg, 2, dtype, seed, workers=workers):
            for n, part in zip(names, parts):
                writers[n].write(name, part)
                if name in vocab_names and start + part.numel() == math.prod(shape) \
                        and extra[n]:
                    for rows in _new_rows(name, seed, extra[n], H, dtype, f"new-{n}"):
                        writers[n].write(name, rows)
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    out = {**dirs, "config": cfg, "ct_tokens": V + new_tokens}
    if permuted:
        out["perm"], out["permutation"] = _write_permuted(root / "perm", dirs["sft"], base_doc,
                                                          cfg, dtype, seed, V)
    return out


def _write_permuted(directory: Path, sft: Path, base_doc: dict, cfg: dict, dtype, seed: int,
                    V: int):
    """The SFT model's weights (its first V rows) with the base vocabulary's ids shuffled."""
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(_seed(seed, "perm", 0, "permutation"))
    perm = torch.randperm(V, generator=g)          # base id i -> perm id perm[i]
    doc = copy.deepcopy(base_doc)
    vocab = doc["model"]["vocab"]
    for t, i in list(vocab.items()):
        vocab[t] = int(perm[i])
    for a in doc.get("added_tokens") or ():
        a["id"] = int(perm[a["id"]])
    doc["post_processor"] = None
    directory.mkdir(parents=True, exist_ok=True)
    c = dict(cfg, bos_token_id=int(perm[1]), eos_token_id=int(perm[2]))
    _write_folder_files(directory, c)
    _folder_tokenizer(directory, doc, c)
    sd = {}
    for f in sorted(sft.glob("model*.safetensors")):
        sd.update(load_file(f))
    inv = torch.argsort(perm)                      # perm id j -> base id inv[j]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in sd:
            sd[name] = sd[name][:V][inv].contiguous()
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    return directory, perm

"""Output agreement with mergekit: fastmerge vs ``mergekit-yaml`` vs the definition.

Install mergekit in its OWN venv (never in the project's), CPU torch only:

    python3 -m venv /work/venv-mk
    /work/venv-mk/bin/pip install torch==2.13.0 mergekit     # mergekit 0.1.5 at the time of writing

(``pip install --dry-run mergekit`` first: if it wants another torch or any ``nvidia-*``
package, abort and pin an older mergekit that accepts torch 2.13.) Then, from the repo
root, with the interpreter where fastmerge is installed (``pip install -e .``):

    python bench/compare_mergekit.py [--mergekit-yaml /work/venv-mk/bin/mergekit-yaml] \
        [--out bench/results/mergekit_compare.json] [--jobs 2] [--workdir DIR --keep]
        [--archs llama,mistral,qwen2] [--dtypes float16,bfloat16,float32] [--cases ...]

(a few minutes on an idle 2-core machine). For every synthetic architecture and dtype it
writes a base + 2 fine-tunes (``fastmerge.testing.write_llama_family``, 2-4M parameters),
and for every merge config (one YAML in mergekit's format, absolute paths) it runs

* mergekit: ``mergekit-yaml CONFIG OUT --no-cuda --no-write-model-card --quiet`` (CPU),
* fastmerge: ``fastmerge merge CONFIG OUT --device cpu --no-progress`` with this
  interpreter (backend auto, i.e. the C backend),
* the definition: ``fastmerge.merge(..., backend="torch", device="cpu", output=DIR)``,
  the project's PyTorch reference (fp64 combine), in-process, with the parameters the
  config MEANS under mergekit's semantics, written out explicitly in ``CASES`` below (not
  parsed from the YAML: a config fastmerge reads differently, e.g. an omitted density,
  shows up as fastmerge differing from the definition).

By default the two tools run as one process per (architecture, dtype) each, calling the
same entry points their console scripts call (``mergekit.scripts.run_yaml:main``,
``fastmerge.cli:main``) with the same arguments once per config, each call's output in its
own log: mergekit's import alone takes ~7 s. ``--one-process-per-merge`` runs the literal
commands instead (one process per config; about 2x slower). Tool processes run with the
work folder as current directory, so they import the same fastmerge as this process.

Then the three outputs are compared entry by entry. Per (architecture, dtype, config):
the fraction of output entries where mergekit and fastmerge differ, where mergekit
differs from the definition, where fastmerge differs from it, and the largest difference
in ulps (units in the last place of the output dtype; +0 and -0 equal). For TIES configs
each differing entry is also classified, cheaply and exactly: with two models an output
entry can only be one of four values ``θ_b + λ·Σ_S w_i τ_i (/ Σ_S w_i)``, one per set S
of models that survive trim and sign election; two outputs nearest to different candidate
values differ by a *decision* (trim or election), otherwise by *rounding* only. (A plain
"> 1 ulp" test does not separate them: where the merged value nearly cancels the base
weight, mergekit's fp16/bf16 arithmetic is off by hundreds of ulps of the small result
with the same set S.) Rounding-only differences are also given in ulps of the largest
input or output magnitude at the entry (``⟨k⟩`` in the table): the scale at which the
arithmetic rounds.

Any config one tool refuses or fails on is recorded with its error (the run goes on), so
the script can simply be rerun when fastmerge's YAML semantics change. Results go to
``--out`` (JSON) and a Markdown table on stdout. ``ties_sv`` has no mergekit counterpart
and is not run.

Architectures (only the config.json and, for qwen2, extra bias tensors differ from the
factory's Llama folders; mergekit picks its architecture definition by ``architectures``):

* ``llama``: LlamaForCausalLM, GQA (8 heads, 4 KV), untied, vocab 2048 (~4.0M params)
* ``mistral``: MistralForCausalLM, 6 heads / 2 KV, head_dim 32, vocab 1000 (~2.0M)
* ``qwen2``: Qwen2ForCausalLM, tied embeddings (no lm_head), q/k/v biases added here
  (1-D tensors: small trim populations), 7 heads / 1 KV, vocab 1536 (~1.9M)

How mergekit 0.1.5 behaves where it matters here: ``dtype`` is the dtype the inputs are
cast to and the arithmetic of task_arithmetic / ties runs in (``out_dtype`` the output's,
default ``dtype``); linear combines in fp32; ties keeps exactly ``int(density * numel)``
entries per tensor (ties at the cutoff broken by sort order); an omitted density is 1.0
(no trim); ``consensus_method`` is not a parameter of its ``ties`` (it is silently
ignored: the election is always by sum), so the ``ties_count`` row measures that; a
``base_model`` in a linear config would be averaged in as an input, so linear configs
name none. ``rescale`` (mergekit's ties default: false) is not written: fastmerge has no
such knob. fastmerge subtracts in fp32, combines in fp32 (the reference in fp64), rounds
once and keeps every entry tied at the cutoff.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "mergekit_compare.json"
MK_TIMEOUT_S = 900

# -- architectures -------------------------------------------------------------------------


def _arch_configs() -> dict:
    from fastmerge.testing import llama_config
    llama = llama_config(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=2048)
    mistral = llama_config(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=6, num_key_value_heads=2, vocab_size=1000,
                           head_dim=32, architectures=["MistralForCausalLM"],
                           model_type="mistral", sliding_window=None)
    for k in ("pretraining_tp", "mlp_bias", "attention_bias"):
        mistral.pop(k, None)
    qwen2 = llama_config(hidden_size=224, intermediate_size=608, num_hidden_layers=3,
                         num_attention_heads=7, num_key_value_heads=1, vocab_size=1536,
                         tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"],
                         model_type="qwen2", use_sliding_window=False, sliding_window=None,
                         max_window_layers=3, rope_theta=1000000.0)
    for k in ("pretraining_tp", "mlp_bias", "attention_bias"):
        qwen2.pop(k, None)
    return {"llama": llama, "mistral": mistral, "qwen2": qwen2}


def _add_qwen2_biases(paths: dict, cfg: dict, dtype: torch.dtype, seed: int = 0) -> None:
    """Add q/k/v_proj biases (Qwen2 has them; the Llama factory does not) to every folder.

    Base ``N(0, 0.02)``; model i: base + a heavy-tailed task vector of RMS ~ the factory's
    default scale for model i, 5 % of it exactly zero; made in fp32, rounded to dtype."""
    from safetensors.torch import load_file, save_file
    from fastmerge.testing import default_tv_scales

    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv, hd = cfg["num_key_value_heads"], cfg["head_dim"]
    dirs = [paths["base"], *paths["models"]]
    scales = default_tv_scales(len(paths["models"]))
    new = [dict() for _ in dirs]
    for layer in range(cfg["num_hidden_layers"]):
        for j, (proj, n) in enumerate((("q_proj", nh * hd), ("k_proj", nkv * hd),
                                       ("v_proj", nkv * hd))):
            name = f"model.layers.{layer}.self_attn.{proj}.bias"
            g = torch.Generator().manual_seed(seed * 1000003 + layer * 31 + j)
            b32 = torch.randn(n, generator=g).mul_(0.02).to(dtype).float()
            new[0][name] = b32.to(dtype)
            for i, s in enumerate(scales):
                z = torch.randn(n, generator=g)
                tv = z * z.abs().pow(2.0) / 3.87  # tail 3, ~unit RMS (E z^6 = 15)
                tv[torch.rand(n, generator=g) < 0.05] = 0.0
                new[i + 1][name] = (b32 + s * tv).to(dtype)
    for d, extra in zip(dirs, new):
        f = Path(d) / "model.safetensors"
        sd = load_file(str(f))
        sd.update(extra)
        save_file(sd, str(f), metadata={"format": "pt"})


ARCH_NOTES = {
    "llama": "LlamaForCausalLM, GQA 8/4 heads, untied, vocab 2048",
    "mistral": "MistralForCausalLM, 6/2 heads, head_dim 32, vocab 1000, untied",
    "qwen2": "Qwen2ForCausalLM, 7/1 heads, tied embeddings, q/k/v biases, vocab 1536",
}


def build_family(root: Path, arch: str, dtype: str) -> dict:
    from fastmerge.testing import write_llama_family
    cfg = _arch_configs()[arch]
    paths = write_llama_family(root, config=cfg, dtype=dtype, n_models=2)
    if arch == "qwen2":
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16,
               "float32": torch.float32}[dtype]
        _add_qwen2_biases(paths, paths["config"], tdt)
    paths["n_params"] = arch_params(arch)
    return paths


def arch_params(arch: str) -> int:
    from fastmerge.testing import n_params
    c = _arch_configs()[arch]
    n = n_params(c)
    if arch == "qwen2":   # + q/k/v biases
        n += c["num_hidden_layers"] * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]
                                       ) * c["head_dim"]
    return n


# -- merge configs -------------------------------------------------------------------------

@dataclass
class Case:
    """One merge: the YAML both tools read, and the definition's explicit parameters."""

    name: str
    note: str
    method: str
    models: list            # [(weight, density or None), ...] for ct, sft
    params: dict            # the YAML's global `parameters`
    definition: dict        # fastmerge.merge kwargs (besides base/models/output/backend)
    use_base: bool = True
    top: dict = field(default_factory=dict)   # extra top-level keys (out_dtype, dtype)
    dtypes: tuple | None = None               # only for these storage dtypes
    base_entry: bool = False                  # list base_model among the models (slerp)

    def yaml_doc(self, base: str | None, models: list[str], dtype: str) -> dict:
        doc = {"merge_method": self.method}
        if self.use_base:
            doc["base_model"] = base
        entries = [{"model": base}] if self.base_entry else []
        for path, (w, d) in zip(models, self.models):
            p = {} if w is None else {"weight": w}
            if d is not None:
                p["density"] = d
            entries.append({"model": path, "parameters": p} if p else {"model": path})
        doc["models"] = entries
        doc["parameters"] = dict(self.params)
        doc["dtype"] = dtype
        doc.update({k: (dtype if v == "$dtype" else v) for k, v in self.top.items()})
        return doc


TIES = {"normalize": True, "lambda": 1.0, "consensus_method": "sum"}


def _ties_def(weights, density, normalize=True, elect="sum", scale=1.0):
    return {"method": "ties", "weights": list(weights), "density": list(density),
            "normalize": normalize, "elect": elect, "scale": scale}


CASES = [
    Case("linear", "weights 1/0.5, normalize, no base_model (mergekit would average it in)",
         "linear", [(1.0, None), (0.5, None)], {"normalize": True},
         {"method": "linear", "weights": [1.0, 0.5], "normalize": True}, use_base=False),
    Case("task_arithmetic", "weights 1/0.5, lambda 0.8, normalize false",
         "task_arithmetic", [(1.0, None), (0.5, None)], {"normalize": False, "lambda": 0.8},
         {"method": "task_arithmetic", "weights": [1.0, 0.5], "normalize": False,
          "scale": 0.8}),
    Case("ties_w1_1", "density 0.5/0.5, weights 1/1, sum election, normalize",
         "ties", [(1.0, 0.5), (1.0, 0.5)], TIES, _ties_def([1, 1], [0.5, 0.5])),
    Case("ties_w1_0.5", "density 0.5/0.5, weights 1/0.5, sum election, normalize",
         "ties", [(1.0, 0.5), (0.5, 0.5)], TIES, _ties_def([1, 0.5], [0.5, 0.5])),
    Case("ties_count", "as ties_w1_0.5 with consensus_method: count (mergekit 0.1.5's ties "
         "has no such parameter and silently ignores it: it always elects by sum)",
         "ties", [(1.0, 0.5), (0.5, 0.5)], {**TIES, "consensus_method": "count"},
         _ties_def([1, 0.5], [0.5, 0.5], elect="count")),
    Case("ties_nonorm", "as ties_w1_0.5 with normalize: false (sum of the selected)",
         "ties", [(1.0, 0.5), (0.5, 0.5)], {**TIES, "normalize": False},
         _ties_def([1, 0.5], [0.5, 0.5], normalize=False)),
    Case("ties_density_omitted", "as ties_w1_0.5 with density omitted everywhere "
         "(mergekit: 1.0, no trim)", "ties", [(1.0, None), (0.5, None)], TIES,
         _ties_def([1, 0.5], [1.0, 1.0])),
    Case("ties_int8_mask", "as ties_w1_0.5 with int8_mask: true (mask dtype only)",
         "ties", [(1.0, 0.5), (0.5, 0.5)], {**TIES, "int8_mask": True},
         _ties_def([1, 0.5], [0.5, 0.5])),
    Case("ties_fp32_out_dtype", "as ties_w1_0.5 with dtype: float32 (mergekit computes in "
         "fp32) and out_dtype: the storage dtype", "ties", [(1.0, 0.5), (0.5, 0.5)], TIES,
         _ties_def([1, 0.5], [0.5, 0.5]), top={"dtype": "float32", "out_dtype": "$dtype"},
         dtypes=("float16", "bfloat16")),
    Case("breadcrumbs", "density 0.5/0.5, gamma 0.01, weights 1/0.5, no election, "
         "normalize false (mergekit's default)", "breadcrumbs", [(1.0, 0.5), (0.5, 0.5)],
         {"gamma": 0.01, "normalize": False},
         {"method": "breadcrumbs", "weights": [1.0, 0.5], "density": [0.5, 0.5],
          "gamma": 0.01, "normalize": False}),
    Case("breadcrumbs_ties", "as breadcrumbs with the sum election",
         "breadcrumbs_ties", [(1.0, 0.5), (0.5, 0.5)], {"gamma": 0.01, "normalize": False},
         {"method": "breadcrumbs_ties", "weights": [1.0, 0.5], "density": [0.5, 0.5],
          "gamma": 0.01, "normalize": False}),
    Case("slerp", "t 0.3 from the base to the CT model (base listed among the models, as "
         "mergekit recipes do)", "slerp", [(None, None)], {"t": 0.3},
         {"method": "slerp", "t": 0.3}, base_entry=True),
    Case("slerp_t_filters", "t by filter and gradient: self_attn 0 → 0.5 → 1 over the "
         "layers, else 0.7", "slerp", [(None, None)],
         {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.7}]},
         {"method": "slerp", "t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                   {"value": 0.7}]}, base_entry=True),
    Case("nuslerp", "weights 1/2, no base_model, whole tensors (nuslerp_flatten default)",
         "nuslerp", [(1.0, None), (2.0, None)], {},
         {"method": "nuslerp", "weights": [1.0, 2.0]}, use_base=False),
    Case("nuslerp_base", "weights 1/2, base_model: SLERP of the task vectors", "nuslerp",
         [(1.0, None), (2.0, None)], {}, {"method": "nuslerp", "weights": [1.0, 2.0]}),
    Case("nuslerp_rows", "weights 1/2, base_model, nuslerp_flatten: false (each row)",
         "nuslerp", [(1.0, None), (2.0, None)], {"nuslerp_flatten": False},
         {"method": "nuslerp", "weights": [1.0, 2.0], "vectors": "rows"}),
    Case("nuslerp_columns", "weights 1/2, base_model, nuslerp_flatten: false, "
         "nuslerp_row_wise: true (each column)", "nuslerp", [(1.0, None), (2.0, None)],
         {"nuslerp_flatten": False, "nuslerp_row_wise": True},
         {"method": "nuslerp", "weights": [1.0, 2.0], "vectors": "columns"}),
    Case("model_stock", "base + 2 models, whole tensors", "model_stock",
         [(None, None), (None, None)], {}, {"method": "model_stock"}),
    Case("model_stock_rows", "base + 2 models, filter_wise: true (each row)", "model_stock",
         [(None, None), (None, None)], {"filter_wise": True},
         {"method": "model_stock", "vectors": "rows"}),
    Case("slerp_fp32_out_dtype", "as slerp with dtype: float32 (mergekit computes in fp32) "
         "and out_dtype: the storage dtype", "slerp", [(None, None)], {"t": 0.3},
         {"method": "slerp", "t": 0.3}, base_entry=True,
         top={"dtype": "float32", "out_dtype": "$dtype"}, dtypes=("float16", "bfloat16")),
    Case("nuslerp_base_fp32_out_dtype", "as nuslerp_base with dtype: float32 and out_dtype: "
         "the storage dtype", "nuslerp", [(1.0, None), (2.0, None)], {},
         {"method": "nuslerp", "weights": [1.0, 2.0]},
         top={"dtype": "float32", "out_dtype": "$dtype"}, dtypes=("float16", "bfloat16")),
    Case("model_stock_fp32_out_dtype", "as model_stock with dtype: float32 and out_dtype: "
         "the storage dtype", "model_stock", [(None, None), (None, None)], {},
         {"method": "model_stock"}, top={"dtype": "float32", "out_dtype": "$dtype"},
         dtypes=("float16", "bfloat16")),
]


# -- running -------------------------------------------------------------------------------

def run_cmd(cmd: list[str], log: Path, env: dict | None = None,
            timeout: float = MK_TIMEOUT_S, cwd: Path | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=cwd)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", (exc.stderr or "") + f"\ntimed out after {timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    except OSError as exc:
        rc, out, err = 127, "", f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n# rc={rc} wall={wall:.2f}s\n--- stdout\n{out}\n"
                   f"--- stderr\n{err}\n")
    row = {"rc": rc, "wall_s": round(wall, 2)}
    if rc:
        row["error"] = _error_line(err or out)
        row["stderr_tail"] = (err or out)[-1500:]
    return row


def _error_line(text: str) -> str:
    """The most telling line of a failed run's output (the last error-looking line)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("error" in ln.lower() or "exception" in ln.lower()) and not ln.startswith("File "):
            return ln[:400]
    return (lines[-1] if lines else "(no output)")[:400]


# One process per family and tool (default): the tool's own command-line entry point,
# called with the same argv as its console script once per config, so the ~7 s import of
# mergekit (transformers, datasets...) is paid once per family instead of once per merge.
# Each call's stdout/stderr (file descriptors 1 and 2) go to that config's log.
BATCH_DRIVER = r"""
import importlib, json, os, sys, time, traceback
spec = json.load(open(sys.argv[1]))
mod, _, attr = spec["entry"].partition(":")
fn = getattr(importlib.import_module(mod), attr)
results = []
for job in spec["jobs"]:
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(log, ("$ " + " ".join(job["argv"]) + "\n").encode())
    os.dup2(log, 1); os.dup2(log, 2)
    t0 = time.perf_counter()
    err = None
    try:
        if hasattr(fn, "main") and hasattr(fn, "params"):       # a click command
            fn.main(args=job["argv"], prog_name=spec["prog"], standalone_mode=False)
            rc = 0
        else:
            rc = fn(job["argv"]) or 0
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        rc, err = 1, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    wall = time.perf_counter() - t0
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(log)
    os.close(saved[0]); os.close(saved[1])
    results.append({"rc": rc, "wall_s": round(wall, 2), "exception": err})
    json.dump(results, open(spec["results"], "w"))
"""


def run_batch(python: str, entry: str, prog: str, jobs: list[tuple], spec_path: Path,
              env: dict, cwd: Path) -> list[dict]:
    """Run ``entry`` (``module:function``) once per (argv, log) in one ``python`` process;
    one result row per job (rc, wall_s, error)."""
    res_path = spec_path.with_suffix(".results.json")
    res_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({"entry": entry, "prog": prog, "results": str(res_path),
                                     "jobs": [{"argv": a, "log": str(lg)} for a, lg in jobs]}))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([python, "-c", BATCH_DRIVER, str(spec_path)], env=env,
                              cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=MK_TIMEOUT_S * max(1, len(jobs)))
        tail = (proc.stderr or proc.stdout)[-1500:]
    except (subprocess.TimeoutExpired, OSError) as exc:
        tail = f"{type(exc).__name__}: {exc}"
    try:
        done = json.loads(res_path.read_text())
    except (OSError, ValueError):
        done = []
    rows = []
    for i, (_, log) in enumerate(jobs):
        if i < len(done):
            row = done[i]
        else:   # the driver died before this job
            row = {"rc": -1, "wall_s": None, "exception": f"batch process ended: {tail}"}
        if row["rc"]:
            text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
            row["error"] = _error_line(text) if text.strip() else (row["exception"] or "")
            row["stderr_tail"] = (text or row["exception"] or "")[-1500:]
        row.pop("exception", None)
        rows.append(row)
    rows_wall = time.perf_counter() - t0
    for row in rows:
        row["batch_wall_s"] = round(rows_wall, 2)
    return rows


def run_definition(case: Case, base: str, models: list[str], dtype: str, out: Path) -> dict:
    import fastmerge
    kwargs = dict(case.definition)
    kwargs.setdefault("dtype", dtype)
    t0 = time.perf_counter()
    try:
        fastmerge.merge(base if case.use_base else None, models[:len(case.models)], **kwargs,
                        output=out,
                        backend="torch", device="cpu", progress=False, overwrite=True)
        row = {"rc": 0}
    except Exception as exc:  # recorded, not fatal
        row = {"rc": 1, "error": f"{type(exc).__name__}: {exc}"[:400],
               "stderr_tail": traceback.format_exc()[-1500:]}
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    row["kwargs"] = kwargs
    return row


def fastmerge_reading(cfg: Path) -> dict:
    """What fastmerge's YAML loader makes of the config (its merge() kwargs) or its error."""
    try:
        from fastmerge.config import load_config
        kw = load_config(cfg)
        return {k: (v if k not in ("base", "models") else "(paths)") for k, v in kw.items()}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}


# -- comparing -----------------------------------------------------------------------------

def load_folder(d: Path) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers whose differences are ulp distances: sign-magnitude bits -> two's complement
    order (+0 and -0 both 0). fp16/bf16/fp32."""
    width = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32}[t.dtype]
    raw = t.contiguous().view(torch.int16 if width == 16 else torch.int32).to(torch.int64)
    raw = raw & ((1 << width) - 1)
    mag = raw & ((1 << (width - 1)) - 1)
    return torch.where((raw >> (width - 1)).bool(), -mag, mag)


PAIRS = (("mk_fm", "mergekit", "fastmerge"), ("mk_def", "mergekit", "definition"),
         ("fm_def", "fastmerge", "definition"))


def ties_candidates(base: torch.Tensor, models: list, weights, normalize: bool,
                    scale: float) -> torch.Tensor:
    """Every value a TIES output entry can take, one row per subset S of the models that
    survive trim + election: ``θ_b + λ·Σ_S w_i τ_i (/ Σ_S w_i if normalize)``, in fp64
    from the stored inputs (row 0: S = ∅, the base value)."""
    b = base.double().flatten()
    taus = [m.double().flatten() - b for m in models]
    rows = []
    for mask in range(1 << len(models)):
        num = torch.zeros_like(b)
        den = 0.0
        for i, (w, t) in enumerate(zip(weights, taus)):
            if mask >> i & 1:
                num += w * t
                den += w
        if normalize and mask and den != 0:
            num /= den
        rows.append(b + scale * num)
    return torch.stack(rows)


def _subset(cands: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the candidate value nearest each entry of x."""
    return (cands - x.double().flatten()).abs().argmin(dim=0)


MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
SUBNORMAL_EXP = {torch.float16: -24, torch.bfloat16: -133, torch.float32: -149}  # ulp = 2^this


def _in_ulps_of_largest(a: torch.Tensor, b: torch.Tensor, others: list, dt) -> float:
    """max |a - b| in ulps (of dt) of the largest magnitude among a, b and ``others`` (the
    inputs θ_b, θ_i): arithmetic at the inputs' scale errs by a few of these, even where
    the result nearly cancels and its own ulp is tiny."""
    big = torch.maximum(a.double().abs(), b.double().abs())
    for o in others:
        big = torch.maximum(big, o.double().abs())
    _, e = torch.frexp(big)
    exp = (e - 1 - MANTISSA_BITS[dt]).clamp(min=SUBNORMAL_EXP[dt]).to(torch.int64)
    ulp = torch.ldexp(torch.ones_like(big), exp)
    return round(float(((a.double() - b.double()).abs() / ulp).max()), 3)


def compare(outs: dict, inputs=None, ties: dict | None = None) -> dict:
    """Entry-by-entry statistics for every pair of outputs present in ``outs``.

    With ``inputs`` = (base state dict, [model state dicts]) and ``ties`` = {weights,
    normalize, scale} (TIES configs), each differing entry is classified: a *decision*
    difference when the two outputs are nearest to different candidate values (different
    surviving sets S, see ``ties_candidates``), else a *rounding* difference."""
    names = {k: set(v) for k, v in outs.items()}
    ref = "definition" if "definition" in outs else next(iter(outs))
    res = {"tensors": {k: len(v) for k, v in names.items()}, "name_mismatch": {}}
    common = set.intersection(*names.values()) if names else set()
    for k, v in names.items():
        if v != names[ref]:
            res["name_mismatch"][k] = {"missing": sorted(names[ref] - v)[:10],
                                       "extra": sorted(v - names[ref])[:10]}
    res["entries"] = int(sum(outs[ref][n].numel() for n in common))
    res["dtype_mismatch"] = sorted({f"{k}:{n}:{outs[k][n].dtype}" for k in outs for n in common
                                    if outs[k][n].dtype != outs[ref][n].dtype})[:10]
    acc = {key: {"differ": 0, "differ_1ulp": 0, "differ_gt1ulp": 0, "decision": 0,
                 "max_ulps": 0, "max_ulps_rounding": 0, "max_rounding_in_input_ulps": 0.0,
                 "max_abs": 0.0, "_pt": []}
           for key, a, b in PAIRS if a in outs and b in outs}
    for n in sorted(common):
        dt = outs[ref][n].dtype
        ts = {k: outs[k][n] for k in outs}
        shapes = {k: tuple(t.shape) for k, t in ts.items()}
        if len(set(shapes.values())) > 1:
            res.setdefault("shape_mismatch", []).append(f"{n}: {shapes}")
            continue
        ts = {k: t.to(dt).flatten() for k, t in ts.items()}
        dists = {}
        for key, a, b in PAIRS:
            if key in acc:
                if dt in (torch.float16, torch.bfloat16, torch.float32):
                    dists[key] = (ordered_bits(ts[a]) - ordered_bits(ts[b])).abs()
                else:
                    dists[key] = (ts[a] != ts[b]).to(torch.int64)
        cands = subsets = None
        if ties is not None and inputs is not None and dists and dt.is_floating_point:
            # candidate values only where some pair differs (a few % of the entries)
            where = torch.nonzero(torch.stack(list(dists.values())).amax(dim=0)).flatten()
            if where.numel():
                cands = ties_candidates(inputs[0][n].flatten()[where],
                                        [m[n].flatten()[where] for m in inputs[1]],
                                        ties["weights"], ties["normalize"], ties["scale"])
                subsets = {k: _subset(cands, t[where]) for k, t in ts.items()}
        for key, a, b in PAIRS:
            if key not in acc:
                continue
            ta, tb, d = ts[a], ts[b], dists[key]
            nd = int((d > 0).sum())
            if not nd:
                continue
            s = acc[key]
            s["differ"] += nd
            s["differ_1ulp"] += int((d == 1).sum())
            s["differ_gt1ulp"] += int((d > 1).sum())
            s["max_ulps"] = max(s["max_ulps"], int(d.max()))
            s["max_abs"] = max(s["max_abs"], float((ta.double() - tb.double()).abs().max()))
            if cands is not None:
                va = cands.gather(0, subsets[a][None])[0]
                vb = cands.gather(0, subsets[b][None])[0]
                dec = torch.zeros_like(d, dtype=torch.bool)
                dec[where] = va != vb
                dec &= d > 0
                nc = int(dec.sum())
                rnd = d[(d > 0) & ~dec]
            else:
                nc, rnd = 0, d
            s["decision"] += nc
            if rnd.numel():
                s["max_ulps_rounding"] = max(s["max_ulps_rounding"], int(rnd.max()))
                if inputs is not None and dt in MANTISSA_BITS:
                    sel = (d > 0) if cands is None else ((d > 0) & ~dec)
                    s["max_rounding_in_input_ulps"] = max(
                        s["max_rounding_in_input_ulps"],
                        _in_ulps_of_largest(ta[sel], tb[sel],
                                            [x[n].flatten()[sel] for x in (inputs[0],
                                                                           *inputs[1])], dt))
            s["_pt"].append((nc / d.numel(), nd / d.numel(), n))
    total = max(res["entries"], 1)
    for key, s in acc.items():
        pt = sorted(s.pop("_pt"), reverse=True)
        s["classified"] = ties is not None and inputs is not None
        for k in ("differ", "differ_1ulp", "differ_gt1ulp", "decision"):
            s["frac_" + k] = s[k] / total
        s["worst_tensors"] = [{"name": n, "frac_differ": round(f, 6),
                               "frac_decision": round(g, 6)} for g, f, n in pt[:3]]
        res[key] = s
    return res


# -- table -----------------------------------------------------------------------------------

def _pct(x) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    p = 100 * x
    return f"{p:.2g}%" if p < 0.1 else f"{p:.3g}%"


def _cell(stats, key, what):
    s = stats.get(key) if stats else None
    if not s:
        return "–"
    if what == "frac":
        f = _pct(s["frac_differ"])
        if s["frac_differ"] and s["classified"]:
            f += f" ({_pct(s['frac_decision'])})"
        return f
    if not s["differ"]:
        return "0"
    cell = f"{s['max_ulps_rounding']} / {s['max_ulps']}"
    if "max_rounding_in_input_ulps" in s and s["differ"] > s["decision"]:
        cell += f" ⟨{s['max_rounding_in_input_ulps']:g}⟩"
    return cell


def markdown(rows: list[dict]) -> str:
    head = ("| arch | dtype | config | entries | mk≠fm (decision) | mk≠def (decision) | "
            "fm≠def (decision) | ulps mk/fm | ulps mk/def | ulps fm/def | status |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        st = r.get("stats")
        status = []
        for tool in ("mergekit", "fastmerge", "definition"):
            if r[tool]["rc"]:
                status.append(f"{tool} failed: {r[tool].get('error', '')}"[:240])
        if st and st.get("name_mismatch"):
            status.append("tensor names differ: " + json.dumps(st["name_mismatch"])[:160])
        if st and st.get("shape_mismatch"):
            status.append("shapes differ: " + "; ".join(st["shape_mismatch"])[:160])
        lines.append("| " + " | ".join([
            r["arch"], r["dtype"], r["case"], f"{st['entries']:,}" if st else "–",
            _cell(st, "mk_fm", "frac"), _cell(st, "mk_def", "frac"), _cell(st, "fm_def", "frac"),
            _cell(st, "mk_fm", "ulps"), _cell(st, "mk_def", "ulps"), _cell(st, "fm_def", "ulps"),
            ("; ".join(status) or "ok").replace("|", "\\|")]) + " |")
    lines.append("")
    lines.append("Fractions are of all output entries; (decision): entries whose two values "
                 "come from different surviving sets (trim / sign election), the rest differ "
                 "by rounding only; no decisions exist for linear / task_arithmetic. ulps: "
                 "largest rounding-only difference / largest difference of all, in units in "
                 "the last place of the output dtype (huge where a result nearly cancels or "
                 "crosses zero); ⟨k⟩: the largest rounding-only difference in ulps of the "
                 "largest input or output magnitude at that entry. mk = mergekit-yaml, "
                 "fm = fastmerge merge (CLI), def = fastmerge.merge(backend='torch').")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------

def _default_mergekit() -> str | None:
    return shutil.which("mergekit-yaml") or (
        "/work/venv-mk/bin/mergekit-yaml" if Path("/work/venv-mk/bin/mergekit-yaml").exists()
        else None)


def _interpreter_of(script: str) -> str | None:
    """The Python interpreter a console script's ``#!`` line names (None if not Python)."""
    try:
        with open(script, "rb") as f:
            first = f.readline().decode(errors="replace")
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if parts and Path(parts[0]).name == "env" and len(parts) > 1:
        parts = [shutil.which(parts[1]) or parts[1]]
    return parts[0] if parts and "python" in Path(parts[0]).name else None


def _mergekit_versions(mk: str) -> dict:
    """mergekit / torch / transformers versions in mergekit's own interpreter."""
    py = _interpreter_of(mk)
    if not py:
        return {}
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('mergekit', 'torch', 'transformers')}))")
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)
    except Exception:
        return {}


def _fastmerge_info(env: dict | None = None, cwd: Path | None = None) -> dict:
    """Version, folder and git state of the fastmerge imported here, and (with env/cwd)
    the folder the tool processes import it from (they must be the same)."""
    import fastmerge
    root = Path(fastmerge.__file__).resolve().parents[1]
    info = {"version": fastmerge.__version__, "path": str(Path(fastmerge.__file__).parent)}
    if env is not None:
        out = subprocess.run([sys.executable, "-c", "import fastmerge; print(fastmerge.__file__)"],
                             capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
        info["tool_path"] = str(Path(out.stdout.strip()).parent) if out.returncode == 0 else None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            info["git_head"] = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10)
            info["git_dirty_files"] = len(dirty.stdout.splitlines())
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-yaml", default=_default_mergekit(),
                    help="mergekit-yaml executable (default: on PATH, else "
                         "/work/venv-mk/bin/mergekit-yaml)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    ap.add_argument("--workdir", default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep inputs and outputs")
    ap.add_argument("--jobs", type=int, default=2, help="tool processes at once (default 2)")
    ap.add_argument("--one-process-per-merge", action="store_true",
                    help="run `mergekit-yaml CONFIG OUT` and `python -m fastmerge merge CONFIG "
                         "OUT` as one process per config (default: one process per "
                         "architecture/dtype and tool calling the same entry points)")
    ap.add_argument("--archs", default="llama,mistral,qwen2")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32")
    ap.add_argument("--fp32-archs", default="llama",
                    help="architectures also run in float32 when float32 is in --dtypes "
                         "(default llama; 'all' for every one)")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES))
    ap.add_argument("--label", default=None, help="free text stored in the JSON (e.g. which "
                                                  "fastmerge tree was measured)")
    args = ap.parse_args(argv)
    if not args.mergekit_yaml or not Path(args.mergekit_yaml).exists():
        ap.error("mergekit-yaml not found: install it (see this script's docstring) and/or "
                 "pass --mergekit-yaml PATH")
    archs = [a for a in args.archs.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    wanted = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(wanted) - {c.name for c in CASES}) + sorted(
        set(archs) - set(ARCH_NOTES)) + sorted(set(dtypes) - {"float16", "bfloat16", "float32"})
    if unknown:
        ap.error(f"unknown arch / dtype / case: {', '.join(unknown)}")
    cases = [c for c in CASES if c.name in wanted]
    fp32_archs = archs if args.fp32_archs == "all" else args.fp32_archs.split(",")

    t_start = time.perf_counter()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fm-vs-mk-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # --jobs tool runs share the cores with the in-process definition: no oversubscription
    # (spinning OpenMP threads of competing processes slow everything down many times)
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # this process (definition, comparison) runs beside them: one thread (many small
    # tensors; spinning intra-op threads on a busy 2-core machine made it 18x slower)
    torch.set_num_threads(1)
    mk_versions = _mergekit_versions(args.mergekit_yaml)
    fm_info = _fastmerge_info(env, work)
    print(f"mergekit {mk_versions.get('mergekit', '?')} ({args.mergekit_yaml}); "
          f"fastmerge {fm_info}; work folder {work}", file=sys.stderr)
    if fm_info.get("tool_path") != fm_info["path"]:
        print(f"warning: the fastmerge processes import {fm_info.get('tool_path')}, this "
              f"process {fm_info['path']}", file=sys.stderr)

    # 1. the checkpoint families
    families, t0 = {}, time.perf_counter()
    for arch in archs:
        for dtype in dtypes:
            if dtype == "float32" and arch not in fp32_archs:
                continue
            root = work / "inputs" / f"{arch}-{dtype}"
            if not (root / "base" / "model.safetensors").exists():
                shutil.rmtree(root, ignore_errors=True)
                families[(arch, dtype)] = build_family(root, arch, dtype)
            else:   # reused (--workdir of an earlier run): same seed, same files
                families[(arch, dtype)] = {"base": root / "base",
                                           "models": [root / "ct", root / "sft"],
                                           "n_params": arch_params(arch)}
    t_build = time.perf_counter() - t0
    print(f"built {len(families)} families in {t_build:.1f} s", file=sys.stderr)

    # 2. the configs and the runs (tools in a pool, the definition here meanwhile)
    rows = []
    for (arch, dtype), fam in families.items():
        for case in cases:
            if case.dtypes and dtype not in case.dtypes:
                continue
            d = work / "runs" / f"{arch}-{dtype}" / case.name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            base, models = str(fam["base"]), [str(m) for m in fam["models"]]
            doc = case.yaml_doc(base, models, dtype)
            (d / "config.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
            shown = copy.deepcopy(doc)
            shown["base_model"] = "base" if case.use_base else None
            if not case.use_base:
                del shown["base_model"]
            for e, nm in zip(shown["models"], ("ct", "sft")):
                e["model"] = nm
            rows.append({"arch": arch, "dtype": dtype, "case": case.name, "note": case.note,
                         "n_params": fam["n_params"], "config": shown, "_dir": d,
                         "_case": case, "_base": base, "_models": models})

    mk_python = _interpreter_of(args.mergekit_yaml)
    batch = not args.one_process_per_merge and mk_python is not None
    mk_flags = ["--no-cuda", "--no-write-model-card", "--quiet"]
    fm_flags = ["--device", "cpu", "--no-progress"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], r["dtype"]), []).append(r)

    def tool_argv(tool, r):
        d = r["_dir"]
        if tool == "mergekit":
            return [str(d / "config.yml"), str(d / "mergekit"), *mk_flags]
        return ["merge", str(d / "config.yml"), str(d / "fastmerge"), *fm_flags]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futs = []
        for (arch, dtype), grp in groups.items():
            fam_dir = work / "runs" / f"{arch}-{dtype}"
            for tool in ("mergekit", "fastmerge"):
                if batch:
                    py, entry, prog = ((mk_python, "mergekit.scripts.run_yaml:main",
                                        "mergekit-yaml") if tool == "mergekit" else
                                       (sys.executable, "fastmerge.cli:main", "fastmerge"))
                    futs.append((grp, tool, pool.submit(
                        run_batch, py, entry, prog,
                        [(tool_argv(tool, r), r["_dir"] / f"{tool}.log") for r in grp],
                        fam_dir / f"{tool}-batch.json", env, work)))
                else:
                    prefix = ([args.mergekit_yaml] if tool == "mergekit" else
                              [sys.executable, "-m", "fastmerge"])
                    for r in grp:
                        futs.append(([r], tool, pool.submit(
                            lambda c, lg: [run_cmd(c, lg, env, cwd=work)],
                            prefix + tool_argv(tool, r), r["_dir"] / f"{tool}.log")))
        for r in rows:
            r["definition"] = run_definition(r["_case"], r["_base"], r["_models"], r["dtype"],
                                             r["_dir"] / "definition")
            r["fastmerge_reads"] = fastmerge_reading(r["_dir"] / "config.yml")
        for grp, tool, fut in futs:
            for r, res in zip(grp, fut.result()):
                for k in ("error", "stderr_tail"):   # messages name the config, not the path
                    if res.get(k):
                        res[k] = res[k].replace(str(r["_dir"] / "config.yml"), "config.yml")
                r[tool] = res
                print(f"{r['arch']:8s} {r['dtype']:9s} {r['case']:22s} {tool:10s} "
                      f"rc={res['rc']} {res['wall_s'] or 0:6.1f} s", file=sys.stderr)

    t_runs = time.perf_counter() - t0
    print(f"ran {len(rows)} configs x 3 in {t_runs:.1f} s", file=sys.stderr)

    # 3. compare
    t0 = time.perf_counter()
    loaded = {}
    for r in rows:
        fam = (r["arch"], r["dtype"])
        if fam not in loaded:
            loaded.clear()   # one family's inputs in memory at a time (rows are grouped)
            loaded[fam] = (load_folder(Path(r["_base"])),
                           [load_folder(Path(m)) for m in r["_models"]])
        dfn = r["_case"].definition
        ties = None
        # the candidate values θ_b + λ·Σ_S w_i τ_i (/ Σ_S w_i) per surviving set S hold for
        # TIES, and for the breadcrumbs methods without normalization (W is then unused)
        if dfn["method"] == "ties" or (dfn["method"].startswith("breadcrumbs")
                                       and not dfn["normalize"]):
            ties = {"weights": dfn["weights"], "normalize": dfn["normalize"],
                    "scale": dfn.get("scale", 1.0)}
        outs = {}
        for tool in ("mergekit", "fastmerge", "definition"):
            if r[tool]["rc"] == 0:
                try:
                    outs[tool] = load_folder(r["_dir"] / tool)
                except Exception as exc:
                    r[tool]["rc"] = -1
                    r[tool]["error"] = f"output unreadable: {type(exc).__name__}: {exc}"[:400]
        r["stats"] = compare(outs, loaded[fam], ties) if len(outs) >= 2 else None
        if not args.keep:
            for tool in ("mergekit", "fastmerge", "definition"):
                shutil.rmtree(r["_dir"] / tool, ignore_errors=True)

    t_compare = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    results = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    doc = {
        "benchmark": "mergekit_compare",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", str(Path(sys.argv[0])), *(argv or sys.argv[1:])]),
        "label": args.label,
        "wall_s": round(total, 1), "build_inputs_s": round(t_build, 1),
        "run_tools_s": round(t_runs, 1), "compare_s": round(t_compare, 1), "jobs": args.jobs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "fastmerge": fm_info,
        "process_mode": "one process per arch/dtype and tool" if batch else
                        "one process per merge",
        "mergekit": {"mergekit_yaml": args.mergekit_yaml, **mk_versions},
        "architectures": {a: {"note": ARCH_NOTES[a], "params": arch_params(a)}
                          for a in archs},
        "how_to_read": ("frac_* are fractions of all output entries of the tensors all "
                        "outputs have; pairs: mk_fm = mergekit vs fastmerge CLI, mk_def = "
                        "mergekit vs the definition (fastmerge.merge backend='torch'), fm_def "
                        "= fastmerge CLI vs the definition. decision: for ties configs, "
                        "entries whose two values are nearest to different candidate values "
                        "theta_b + lambda * sum_S w_i tau_i (/ sum_S w_i), i.e. a different "
                        "set S of models survived trim + election; the other differing "
                        "entries differ by rounding (max_ulps_rounding; "
                        "max_rounding_in_input_ulps: the same in ulps of the largest of "
                        "|base|, |model_i|, |a|, |b| at that entry). differ_1ulp / "
                        "differ_gt1ulp: by exactly 1 / more than 1 ulp (ulp distance is "
                        "large across zero and for outputs much smaller than the base weight, "
                        "so >1 ulp is not by itself a decision)"),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(markdown(results))
    print(f"\n{len(results)} configs x 3 merges in {total:.0f} s (inputs {t_build:.0f} s, "
          f"merges {t_runs:.0f} s, comparison {t_compare:.0f} s); "
          f"JSON: {out}; work folder {work}" + ("" if args.keep else " (outputs removed)"))
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

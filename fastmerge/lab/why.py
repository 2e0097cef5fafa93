"""Why the slack helps as much (or as little) as it does: where the SFT model's skill
lives in its task vector. Runs on the models the full run saved (``--models``).

For each seed: the base plus only the top-``d`` entries (by |τ|) of one model's task
vector — ``fastmerge.merge(base, [model], method="ties", density=d)`` — and how much of
that model's ability survives: L1 task accuracy for the SFT model, L2 facts (cloze) and
perplexity for the largest-budget CT model. If a small top fraction carried the SFT
model's skill, protecting that fraction (TIES-SV) would protect the skill.

``python -m fastmerge.lab.why --models lab-run/models --out docs/lab``
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import fastmerge

from . import data
from . import train as T
from .run import Settings

FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
# Alternatives measured on the saved models (every merge through fastmerge.merge):
# - favouring the SFT model in the election by its weight instead of a slack: with
#   normalize (the disjoint mean), w_i scales model i's votes and its share of the mean
#   where both models are selected, not an entry only one model contributes;
# - ties_sv with no slack on the embeddings: the SFT model leaves the embedding rows of
#   tokens it never saw exactly unchanged (τ = 0); once s exceeds the tensor's nonzero
#   fraction, u = 0 protects those zeros, their zero vote elects +, and every negative
#   CT update there (the L2 rows) is dropped. Leaving the embeddings out of the slack
#   (a filter) approximates "protect nonzero entries only".


def _no_embed(v: float) -> list:
    return [0.0, [{"filter": "embed_tokens", "value": 0.0}, {"value": v}]]


ALTERNATIVES = ([(f"ties w_sft={k:g}", "ties", dict(weights=[1.0, k])) for k in (2, 4)]
                + [(f"ties_sv s={v:g} no-embed", "ties_sv", dict(slack=_no_embed(v)))
                   for v in (0.2, 0.3, 0.5)])


def main(models_dir: str, out_dir: str, s: Settings = Settings(), jobs: int = 1) -> dict:
    """``why.json`` in ``out_dir`` for every ``seed*.pt`` in ``models_dir`` (``jobs``
    seeds at a time)."""
    from concurrent.futures import ProcessPoolExecutor
    files = sorted(Path(models_dir).glob("seed*.pt"), key=lambda f: int(f.stem[4:]))
    if not files:
        raise FileNotFoundError(f"{models_dir}: no seed*.pt (run python -m fastmerge.lab "
                                f"--models {models_dir} first)")
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_seed, files, [s] * len(files)))
    else:
        rows = [_seed(f, s) for f in files]
    out = {"fractions": list(FRACTIONS), "alternatives": [a[0] for a in ALTERNATIVES],
           "seeds": rows}
    text = json.dumps(out, indent=1)
    Path(out_dir, "why.json").write_text(text)
    results = Path(out_dir, "results.json")
    if results.exists():   # tables read the JSON form (string keys)
        Path(out_dir, "why.md").write_text(tables(json.loads(text),
                                                  json.loads(results.read_text())))
    return out


def _ms(xs, fmt="{:.3f}") -> str:
    return f"{fmt.format(sum(xs) / len(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def tables(why: dict, results: dict) -> str:
    """Markdown: the top-d ablations, then each alternative per CT budget (mean (min–max)
    over seeds) with its paired L2 gain over ``ties`` from the main run."""
    S = sorted(why["seeds"], key=lambda r: r["seed"])
    R = {r["seed"]: r for r in results["seeds"]}
    out = [f"Seeds {[r['seed'] for r in S]}. SFT embedding: nonzero fraction of τ "
           f"{_ms([r['sft_embed_nonzero'] for r in S])}; its slack threshold u at "
           + ", ".join(f"s={k}: {_ms([r['sft_embed_u'][k] for r in S], '{:.2g}')}"
                       for k in S[0]["sft_embed_u"]) + ".", "",
           "**Base + only the top-d of one task vector** (by |τ|)", "",
           "| d | SFT: L1 task accuracy | CT (largest budget): L2 cloze | CT: L2 perplexity |",
           "|---|---|---|---|"]
    for d in why["fractions"]:
        k = str(d)
        out.append(f"| {d:g} | {_ms([r['sft_l1_acc'][k] for r in S])} | "
                   f"{_ms([r['ct_l2_cloze'][k] for r in S])} | "
                   f"{_ms([r['ct_l2_ppl'][k] for r in S], '{:.1f}')} |")
    budgets = list(S[0]["alternatives"][why["alternatives"][0]])
    tokens = [R[S[0]["seed"]]["budgets"][b]["tokens"] for b in budgets]
    out += ["", "**Alternatives** (density 0.5): mean (min–max) over seeds; gain = L2 task "
            "accuracy minus `ties`'s, paired by seed, with the seeds above / below 0", "",
            "| | | " + " | ".join(f"{t / 1e3:g}k" for t in tokens) + " |",
            "|---|---|" + "---|" * len(budgets)]
    for alt in why["alternatives"]:
        for key, fmt in (("l2_acc", "{:.3f}"), ("l1_acc", "{:.3f}"), ("l2_ppl", "{:.1f}")):
            out.append(f"| {alt} | {key} | " + " | ".join(
                _ms([r["alternatives"][alt][b][key] for r in S], fmt) for b in budgets) + " |")
        gains = [[r["alternatives"][alt][b]["l2_acc"]
                  - R[r["seed"]]["budgets"][b]["merges"]["ties"]["l2_acc"] for r in S]
                 for b in budgets]
        out.append(f"| {alt} | gain | " + " | ".join(
            f"{sum(g) / len(g):+.3f} {sum(x > 1e-9 for x in g)}/{sum(x < -1e-9 for x in g)}"
            for g in gains) + " |")
    return "\n".join(out) + "\n"


def _seed(f: Path, s: Settings) -> dict:
    torch.set_num_threads(1)
    world = data.make_world()
    tok = T.train_tokenizer(world, s.vocab_size)
    model = T.new_model(T.model_config(tok.get_vocab_size(), s.hidden, s.layers, s.seq_len), 0)
    q1 = data.questions(world, "l1", data.test_objects())
    c2 = data.clozes(world, "l2", data.test_objects())
    ck = torch.load(f)
    seed = int(f.stem[4:])
    ppl = T.stream(tok, world, {"l2": 1.0}, random.Random(10_000 + seed), s.ppl_seqs,
                   s.seq_len)
    ct = ck["ct"][max(ck["ct"])]
    row = dict(seed=seed, ct_steps=max(ck["ct"]), sft_l1_acc={}, ct_l2_cloze={},
               ct_l2_ppl={})
    for d in FRACTIONS:
        model.load_state_dict(fastmerge.merge(ck["base"], [ck["sft"]], method="ties",
                                              density=d, progress=False).state_dict)
        row["sft_l1_acc"][d] = T.task_accuracy(model, tok, q1)
        model.load_state_dict(fastmerge.merge(ck["base"], [ct], method="ties",
                                              density=d, progress=False).state_dict)
        row["ct_l2_cloze"][d] = T.task_accuracy(model, tok, c2)
        row["ct_l2_ppl"][d] = T.perplexity(model, ppl)
    emb = "model.embed_tokens.weight"
    tau = ck["sft"][emb].float() - ck["base"][emb].float()
    row["sft_embed_nonzero"] = float((tau != 0).float().mean())
    row["sft_embed_u"] = {}
    for v in (0.2, 0.3, 0.5):
        rep = fastmerge.merge(ck["base"], [ct, ck["sft"]], method="ties_sv",
                              density=s.density, slack=[0.0, v], progress=False).report
        row["sft_embed_u"][v] = next(t["u"][1] for t in rep["tensors"] if t["name"] == emb)
    q2 = data.questions(world, "l2", data.test_objects())
    row["alternatives"] = {}
    for label, method, knobs in ALTERNATIVES:
        accs = {}
        for b, ct_b in sorted(ck["ct"].items()):
            model.load_state_dict(fastmerge.merge(ck["base"], [ct_b, ck["sft"]],
                                                  method=method, density=s.density,
                                                  progress=False, **knobs).state_dict)
            accs[b] = dict(l2_acc=T.task_accuracy(model, tok, q2),
                           l1_acc=T.task_accuracy(model, tok, q1),
                           l2_ppl=T.perplexity(model, ppl))
        row["alternatives"][label] = accs
    print(f"seed {seed} done", flush=True)
    return row


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m fastmerge.lab.why", description=__doc__)
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    main(a.models, a.out, jobs=a.jobs)

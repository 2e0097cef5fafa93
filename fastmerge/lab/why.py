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


def main(models_dir: str, out_dir: str, s: Settings = Settings()) -> dict:
    torch.set_num_threads(1)
    world = data.make_world()
    tok = T.train_tokenizer(world, s.vocab_size)
    model = T.new_model(T.model_config(tok.get_vocab_size(), s.hidden, s.layers, s.seq_len), 0)
    q1 = data.questions(world, "l1", data.test_objects())
    c2 = data.clozes(world, "l2", data.test_objects())
    out = {"fractions": list(FRACTIONS), "seeds": []}
    for f in sorted(Path(models_dir).glob("seed*.pt")):
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
        print(row, flush=True)
        out["seeds"].append(row)
    Path(out_dir, "why.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m fastmerge.lab.why", description=__doc__)
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    main(a.models, a.out)

"""The experiment grid: base → SFT, CT at several token budgets, CT-then-SFT, and every
merge of a CT model with the SFT model through ``fastmerge.merge``; results JSON + plots.

Per seed (the seed draws the initialisation, the sentences and the SFT batches):

1. base: pre-trained on L1 documents (a fraction ``l2_in_base`` of them in L2);
2. SFT: base + ``sft_steps`` of task fine-tuning on L1 questions (train objects);
3. CT: base + continual pre-training on L2 documents at a constant learning rate,
   saved after each budget (the budgets are nested prefixes of one run: a model saved
   after ``k`` steps is what a CT run of ``k`` steps would give);
4. CT-then-SFT: each CT model + the same task fine-tuning;
5. merges of (CT, SFT) onto the base, for each method of ``merge_configs``.

Measures: held-out task accuracy in L2 and L1, L2 perplexity, the L2 and L1 facts as
cloze sentences, and from the merge report the fraction of the SFT model's top-``s``
entries that plain TIES's election drops.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass

import torch

import fastmerge
from fastmerge.methods import ALIASES

from . import data
from . import train as T


@dataclass
class Settings:
    """Everything the run depends on (recorded in results.json). Steps are optimizer
    steps of ``batch_size`` sequences of ``seq_len`` tokens."""
    seeds: tuple = (0, 1, 2, 3, 4)
    budgets: tuple = (50, 100, 200, 400, 800, 1600)   # CT steps (tokens = steps·batch·seq_len)
    pretrain_steps: int = 600
    sft_steps: int = 150
    batch_size: int = 32
    seq_len: int = 64
    hidden: int = 64
    layers: int = 2
    vocab_size: int = 384
    l2_in_base: float = 0.005
    lr_pretrain: float = 3e-3
    lr_ct: float = 1e-3
    lr_sft: float = 1e-3
    density: float = 0.5
    slacks: tuple = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)
    smoke: bool = False
    ppl_seqs: int = 64

    @classmethod
    def smoke_settings(cls) -> "Settings":
        return cls(seeds=(0,), budgets=(10,), pretrain_steps=20, sft_steps=10,
                   batch_size=8, slacks=(0.05,), smoke=True, ppl_seqs=8)


def merge_configs(s: Settings) -> list:
    """(label, method, knobs) of every merge, in plot order: the one list of methods.
    Every merge uses weights 1 and the same density; slack protects the SFT model only
    (model 1). The ``(sum)`` rows are diagnostics: the same election without the
    disjoint mean (``normalize=False``). A method fastmerge does not have (yet) is left
    out; a new one is one line here."""
    d = s.density
    cfgs = [("task_arithmetic", "task_arithmetic", {}),
            ("ties", "ties", dict(density=d))]
    cfgs += [(f"ties_sv s={v:g}", "ties_sv", dict(density=d, slack=[0.0, v]))
             for v in s.slacks if v <= d]
    cfgs += [("ties (sum)", "ties", dict(density=d, normalize=False)),
             ("ties_sv s=0.2 (sum)", "ties_sv", dict(density=d, slack=[0.0, 0.2],
                                                     normalize=False)),
             ("dare_ties", "dare_ties", dict(density=d, seed=0)),
             ("slerp", "slerp", dict(t=0.5))]
    return [c for c in cfgs if c[1] in ALIASES]


def _sft_fraction(report) -> dict:
    """The SFT model's (model 1) protected entries and how many plain TIES's election and
    the merge itself dropped, over the whole checkpoint."""
    t = report["totals"][1]
    p = t["protected"]
    return dict(protected=p, ties_important_dropped=t["ties_important_dropped"],
                important_dropped=t["important_dropped"],
                ties_dropped_frac=t["ties_important_dropped"] / p if p else None,
                dropped_frac=t["important_dropped"] / p if p else None,
                sft_selected=t["selected"], sft_kept=t["kept"],
                ct_selected=report["totals"][0]["selected"],
                ct_kept=report["totals"][0]["kept"])


def run_seed(seed: int, s: Settings, world, tok, log=print, models_dir=None) -> dict:
    torch.set_num_threads(1)
    t0 = time.time()
    cfg = T.model_config(tok.get_vocab_size(), s.hidden, s.layers, s.seq_len)
    model = T.new_model(cfg, seed)
    rng = random.Random(seed)
    pre = T.stream(tok, world, {"l1": 1 - s.l2_in_base, "l2": s.l2_in_base}, rng,
                   s.pretrain_steps * s.batch_size, s.seq_len)
    T.pretrain(model, pre, s.batch_size, s.lr_pretrain, seed=seed)
    base = T.state_dict(model)
    sft_pairs = [(p, a) for p, a, _ in data.questions(world, "l1", data.train_objects())]
    q1 = data.questions(world, "l1", data.test_objects())
    q2 = data.questions(world, "l2", data.test_objects())
    c1 = data.clozes(world, "l1", data.test_objects())
    c2 = data.clozes(world, "l2", data.test_objects())
    ppl_l2 = T.stream(tok, world, {"l2": 1.0}, random.Random(10_000 + seed), s.ppl_seqs,
                      s.seq_len)

    def measure(sd) -> dict:
        model.load_state_dict(sd)
        return dict(l2_acc=T.task_accuracy(model, tok, q2),
                    l1_acc=T.task_accuracy(model, tok, q1),
                    l2_ppl=T.perplexity(model, ppl_l2),
                    l2_cloze=T.task_accuracy(model, tok, c2),
                    l1_cloze=T.task_accuracy(model, tok, c1))

    def sft_of(sd) -> dict:
        model.load_state_dict(sd)
        T.finetune(model, tok, sft_pairs, s.sft_steps, s.batch_size, s.lr_sft, seed)
        return T.state_dict(model)

    out = dict(seed=seed, base=measure(base))
    sft = sft_of(base)
    out["sft"] = measure(sft)
    log(f"seed {seed}: base {out['base']}  sft {out['sft']}  ({time.time() - t0:.0f}s)")
    model.load_state_dict(base)
    ct_data = T.stream(tok, world, {"l2": 1.0}, random.Random(20_000 + seed),
                       max(s.budgets) * s.batch_size, s.seq_len)
    cts = T.pretrain(model, ct_data, s.batch_size, s.lr_ct, warmup=10, cosine=False,
                     save_at=set(s.budgets), seed=seed)
    if models_dir:
        torch.save(dict(base=base, sft=sft, ct=cts), f"{models_dir}/seed{seed}.pt")
    out["budgets"] = {}
    for b in s.budgets:
        row = dict(steps=b, tokens=b * s.batch_size * s.seq_len, ct=measure(cts[b]),
                   ct_then_sft=measure(sft_of(cts[b])), merges={})
        for label, method, knobs in merge_configs(s):
            # SLERP interpolates two models, as in mergekit's recipes: from the CT model
            # (t = 0) to the SFT model (t = 1); every other method merges both into the base
            ends = (cts[b], [sft]) if method == "slerp" else (base, [cts[b], sft])
            res = fastmerge.merge(*ends, method=method, progress=False, **knobs)
            m = measure(res.state_dict)
            if res.report.get("totals") and "protected" in res.report["totals"][1]:
                m.update(_sft_fraction(res.report))
            row["merges"][label] = m
        out["budgets"][str(b)] = row
        log(f"seed {seed} budget {b}: ct {row['ct']['l2_acc']:.3f} "
            f"ct+sft {row['ct_then_sft']['l2_acc']:.3f} "
            + " ".join(f"{k} {v['l2_acc']:.3f}" for k, v in row["merges"].items())
            + f"  ({time.time() - t0:.0f}s)")
    return out


def summarize(results: dict) -> dict:
    """Mean, min and max over seeds of every measure, per budget and configuration."""
    seeds = results["seeds"]
    first = seeds[0]
    summ = {}
    for b in first["budgets"]:
        row = {}
        names = ["ct", "ct_then_sft"] + [f"merge:{k}" for k in first["budgets"][b]["merges"]]
        for name in names:
            vals = [(sd["budgets"][b][name] if not name.startswith("merge:")
                     else sd["budgets"][b]["merges"][name[6:]]) for sd in seeds]
            row[name] = {k: _stats([v[k] for v in vals]) for k in vals[0]
                         if isinstance(vals[0][k], (int, float)) and vals[0][k] is not None}
        summ[b] = row
    for name in ("base", "sft"):
        summ[name] = {k: _stats([sd[name][k] for sd in seeds]) for k in first[name]}
    return summ


def _print(msg: str) -> None:
    print(msg, flush=True)


def _stats(xs) -> dict:
    xs = [x for x in xs if x is not None]
    return dict(mean=sum(xs) / len(xs), min=min(xs), max=max(xs), n=len(xs))


def tables(results: dict) -> str:
    """Markdown tables of the summary: per measure, one row per model or merge and one
    column per CT budget, each cell ``mean (min–max)`` over the seeds."""
    summ = results["summary"]
    budgets = [b for b in summ if b not in ("base", "sft")]
    tokens = [results["seeds"][0]["budgets"][b]["tokens"] for b in budgets]
    first = summ[budgets[0]]
    seeds = [r["seed"] for r in results["seeds"]]
    out = [f"Seeds {seeds}; each cell: mean (min–max) over the seeds. "
           f"SFT model alone: L2 accuracy {summ['sft']['l2_acc']['mean']:.3f}, "
           f"L1 accuracy {summ['sft']['l1_acc']['mean']:.3f}; base: L1 accuracy "
           f"{summ['base']['l1_acc']['mean']:.3f}. Chance: {1 / data.N_COLOURS:.3f}.", ""]
    for key, title, fmt in (("l2_acc", "L2 task accuracy (held-out questions)", "{:.3f}"),
                            ("l1_acc", "L1 task accuracy (held-out questions)", "{:.3f}"),
                            ("l2_cloze", "L2 facts as cloze sentences (no template)", "{:.3f}"),
                            ("l2_ppl", "L2 perplexity", "{:.1f}"),
                            ("ties_dropped_frac",
                             "Fraction of the SFT model's top-s entries that plain TIES drops",
                             "{:.3f}")):
        rows = [n for n in first if key in first[n]]
        if not rows:
            continue
        out += [f"**{title}**", "",
                "| | " + " | ".join(f"{t / 1e3:g}k" for t in tokens) + " |",
                "|---|" + "---|" * len(budgets)]
        for n in rows:
            cells = []
            for b in budgets:
                v = summ[b][n][key]
                cells.append(f"{fmt.format(v['mean'])} ({fmt.format(v['min'])}–"
                             f"{fmt.format(v['max'])})")
            out.append(f"| {n.replace('merge:', '')} | " + " | ".join(cells) + " |")
        out.append("")
    merges = list(results["seeds"][0]["budgets"][budgets[0]]["merges"])
    if "ties" in merges:
        out += ["**L2 task accuracy minus that of `ties`, paired by seed**: mean (min–max), "
                "and the number of seeds where it is above / below 0", "",
                "| | " + " | ".join(f"{t / 1e3:g}k" for t in tokens) + " |",
                "|---|" + "---|" * len(budgets)]
        for k in merges:
            if k == "ties" or not k.startswith(("ties", "task")):
                continue
            cells = []
            for b in budgets:
                d = [r["budgets"][b]["merges"][k]["l2_acc"]
                     - r["budgets"][b]["merges"]["ties"]["l2_acc"] for r in results["seeds"]]
                cells.append(f"{sum(d) / len(d):+.3f} ({min(d):+.3f}–{max(d):+.3f}) "
                             f"{sum(x > 1e-9 for x in d)}/{sum(x < -1e-9 for x in d)}")
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


MAIN_PLOT = ("task_arithmetic", "ties", "ties_sv s=0.05", "ties_sv s=0.2", "dare_ties",
             "slerp")
# Above this slack the SFT model's embedding has fewer nonzero τ entries (≈ 21 %: the rows
# of tokens the SFT data never contain are unchanged) than s·|P|, so u = 0 and the exact
# zeros count as protected (and, never selected, as dropped): the fraction stops meaning
# "important entries lost" (docs/lab.md).
DROP_PLOT_MAX_SLACK = 0.2
GAIN_PLOT = ("ties_sv s=0.05", "ties_sv s=0.1", "ties_sv s=0.2", "task_arithmetic")


def plot(results: dict, out_dir) -> list:
    """The PNGs: L2 / L1 task accuracy and L2 perplexity vs CT tokens (baselines and the
    ``MAIN_PLOT`` merges; mean over seeds, band = min..max), the SFT model's important
    entries that plain TIES drops, and accuracy vs slack per CT budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results["summary"]
    budgets = [b for b in summ if b not in ("base", "sft")]
    tokens = [results["seeds"][0]["budgets"][b]["tokens"] for b in budgets]
    merges = list(results["seeds"][0]["budgets"][budgets[0]]["merges"])
    names = ["ct", "ct_then_sft"] + [f"merge:{k}" for k in MAIN_PLOT if k in merges]
    n = len(results["seeds"])
    paths = []

    def band(ax, x, st, label, ls="-"):
        line, = ax.plot(x, [v["mean"] for v in st], ls, marker="o", ms=3, label=label)
        ax.fill_between(x, [v["min"] for v in st], [v["max"] for v in st],
                        color=line.get_color(), alpha=0.12)

    def save(fig, fname):
        fig.tight_layout()
        p = f"{out_dir}/{fname}"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    for key, ylabel, fname in (("l2_acc", "L2 task accuracy (held out)", "l2_accuracy.png"),
                               ("l1_acc", "L1 task accuracy (held out)", "l1_accuracy.png"),
                               ("l2_ppl", "L2 perplexity", "l2_perplexity.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for name in names:
            band(ax, tokens, [summ[b][name][key] for b in budgets],
                 name.replace("merge:", ""), "-" if name.startswith("merge:") else "--")
        if key == "l2_ppl":
            ax.set_yscale("log")
        else:
            if key == "l1_acc":
                ax.axhline(summ["sft"][key]["mean"], color="gray", lw=0.8, ls=":",
                           label="sft")
            ax.axhline(1 / data.N_COLOURS, color="black", lw=0.6, ls=":", label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("CT tokens (L2)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel}: mean of {n} seeds, band = min..max", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        save(fig, fname)

    if "ties" in merges:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for j, k in enumerate(x for x in GAIN_PLOT if x in merges):
            per_seed = [[r["budgets"][b]["merges"][k]["l2_acc"]
                         - r["budgets"][b]["merges"]["ties"]["l2_acc"] for b in budgets]
                        for r in results["seeds"]]
            mean = [sum(c) / len(c) for c in zip(*per_seed)]
            line, = ax.plot(tokens, mean, marker="o", ms=3, label=k)
            for row in per_seed:   # each seed, nudged sideways to stay visible
                ax.scatter([t * 1.04 ** (j - 1.5) for t in tokens], row, s=8,
                           color=line.get_color(), alpha=0.5)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("CT tokens (L2)")
        ax.set_ylabel("L2 task accuracy minus ties's (same seed)")
        ax.set_title(f"Gain over plain TIES, per seed (dots) and mean of {n} seeds",
                     fontsize=10)
        ax.legend(fontsize=8)
        save(fig, "l2_gain_over_ties.png")

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for k in merges:
        if (k.startswith("ties_sv") and "(" not in k
                and float(k.split("=")[1]) <= DROP_PLOT_MAX_SLACK):
            st = [summ[b][f"merge:{k}"].get("ties_dropped_frac") for b in budgets]
            if all(st):
                band(ax, tokens, st, f"top {k.split('=')[1]} of |τ_SFT|")
    ax.set_xscale("log")
    ax.set_xlabel("CT tokens (L2)")
    ax.set_ylabel("fraction dropped by plain TIES")
    ax.set_title("The SFT model's top-s entries that TIES's sign election drops", fontsize=10)
    ax.legend(fontsize=8)
    save(fig, "important_dropped.png")

    slack_rows = [("ties", 0.0)] + [(k, float(k.split("=")[1])) for k in merges
                                    if k.startswith("ties_sv") and "(" not in k]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, ylabel in ((axes[0], "l2_acc", "L2 task accuracy"),
                            (axes[1], "l1_acc", "L1 task accuracy")):
        for b, tk in zip(budgets, tokens):
            band(ax, [v for _, v in slack_rows],
                 [summ[b][f"merge:{k}"][key] for k, _ in slack_rows], f"{tk / 1e3:g}k tokens")
        ax.set_xlabel("slack s of the SFT model (0 = ties)")
        ax.set_ylabel(ylabel)
        ax.axhline(1 / data.N_COLOURS, color="black", lw=0.6, ls=":")
    axes[0].legend(fontsize=7, title="CT budget", title_fontsize=7)
    fig.suptitle(f"TIES-SV: accuracy vs slack (density {results['settings']['density']}, "
                 f"mean of {n} seeds)", fontsize=10)
    save(fig, "slack_sweep.png")
    return paths


def main(settings: Settings, out_dir: str, log=print, jobs: int = 1, models_dir=None) -> dict:
    """Run every seed (``jobs`` at a time, one thread each), write ``results.json`` and
    the plots to ``out_dir``; ``models_dir``: also save each seed's base, SFT and CT
    models there."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from pathlib import Path
    torch.set_num_threads(1)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if models_dir:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    world = data.make_world()
    tok = T.train_tokenizer(world, settings.vocab_size)
    results = dict(format="fastmerge-lab/1", settings=asdict(settings),
                   merges=[dict(label=lb, method=m, knobs=k)
                           for lb, m, k in merge_configs(settings)],
                   torch=torch.__version__, fastmerge=fastmerge.__version__, seeds=[])
    def done(seed_result):   # results.json after every seed: a cut-short run keeps them
        results["seeds"] = sorted(results["seeds"] + [seed_result], key=lambda r: r["seed"])
        results["summary"] = summarize(results)
        results["seconds"] = time.time() - t0
        Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
        Path(out_dir, "results.md").write_text(tables(results))

    if jobs > 1 and len(settings.seeds) > 1:
        with ProcessPoolExecutor(min(jobs, len(settings.seeds))) as ex:
            futs = [ex.submit(run_seed, seed, settings, world, tok, _print, models_dir)
                    for seed in settings.seeds]
            for f in as_completed(futs):
                done(f.result())
    else:
        for seed in settings.seeds:
            done(run_seed(seed, settings, world, tok, log, models_dir))
    results["plots"] = [Path(p).name for p in plot(results, out_dir)]
    Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    log(f"done in {time.time() - t0:.0f}s: {out_dir}/results.json")
    return results

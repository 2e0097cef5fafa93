"""DELLA's drop: fastmerge's keep probabilities and rescale against mergekit's, measured.

    # in an environment with mergekit installed (fastmerge is imported from this checkout)
    python bench/compare_della_mergekit.py --out bench/results/della_vs_mergekit.json

Masks are random on both sides (mergekit: torch.bernoulli; fastmerge: Philox), so they
are compared in distribution: on one fp16 task vector of R rows × M, for (density,
epsilon) pairs, the keep rate per rank decile of the row (rank by |τ|), over several
seeds, against the decile's mean p = (d − ε) + ρ/(M − 1)·2ε; and the rescaled task
vector's L1 norm relative to the original (mergekit rescales each tensor back to its L1
norm; fastmerge weighs each kept entry 1/p, exact in expectation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmerge import della, philox  # noqa: E402


def deciles(kept: torch.Tensor, rank: torch.Tensor, M: int, where: torch.Tensor) -> list[float]:
    """Mean of ``kept`` per rank decile of the row, over the entries ``where`` holds (τ ≠ 0:
    mergekit's output cannot show whether it kept a zero)."""
    dec = rank * 10 // M
    return [float(kept[(dec == k) & where].double().mean()) for k in range(10)]


def mean_columns(xs: list[list[float]]) -> list[float]:
    """The mean of each position over the seeds' lists."""
    return [sum(c) / len(c) for c in zip(*xs)]


def parse_args(doc: str, rows: int):
    """The comparison scripts' options: --rows (default ``rows``), --cols, --seeds, --out."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rows", type=int, default=rows)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--out")
    return ap.parse_args()


def task_vector(R: int, M: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, model, τ): an fp16 base and model of R·M entries (fixed seed), τ in fp32."""
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(R * M, generator=g)).half()
    model = (base.float() + 0.003 * torch.randn(R * M, generator=g)).half()
    return base, model, model.float() - base.float()


def save(rows: list[dict], out: str | None) -> None:
    """Write the comparison (date, command, torch version, rows) as JSON to ``out``."""
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
           "rows": rows}
    if out:
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    from mergekit.sparsify import della_magprune     # LGPL: called, not copied
    args = parse_args(__doc__, rows=64)
    R, M = args.rows, args.cols
    base, model, tau = task_vector(R, M)
    rank = della.ranks((tau.abs()).view(torch.int32).unsqueeze(0), (R, M))[0]
    rows = []
    for d, e in ((0.4, 0.15), (0.2, 0.1), (0.7, 0.25)):
        T = della.keep_thresholds(base, model.unsqueeze(0), (R, M), (d,), (e,))[0]
        p = T.double() / 2**32
        nz = tau != 0
        want = deciles(p, rank, M, nz)
        fm, mk, l1_fm, l1_mk = [], [], [], []
        for s in range(args.seeds):
            key = philox.tensor_key(s, "w")
            kept = philox.random_words(key, 0, 0, R * M) < T
            fm.append(deciles(kept, rank, M, nz))
            out = torch.where(kept, tau.double() * 2**32 / T.double(), 0.0)
            l1_fm.append(float(out.abs().sum() / tau.double().abs().sum()))
            torch.manual_seed(s)
            res = della_magprune(tau.view(R, M), d, e, rescale_norm=None)
            mk.append(deciles((res != 0).reshape(-1), rank, M, nz))
            torch.manual_seed(s)
            from mergekit.sparsify import RescaleNorm
            res_l1 = della_magprune(tau.view(R, M), d, e, rescale_norm=RescaleNorm.l1)
            l1_mk.append(float(res_l1.double().abs().sum() / tau.double().abs().sum()))
        row = {"density": d, "epsilon": e, "rows": R, "cols": M, "seeds": args.seeds,
               "p_per_decile": want, "fastmerge_keep_per_decile": mean_columns(fm),
               "mergekit_keep_per_decile": mean_columns(mk),
               "nonzero_fraction": float(nz.double().mean()),
               "l1_ratio_fastmerge": sum(l1_fm) / len(l1_fm),
               "l1_ratio_mergekit": sum(l1_mk) / len(l1_mk)}
        rows.append(row)
        print(f"d={d} eps={e}: p {['%.3f' % x for x in want[::3]]} fastmerge "
              f"{['%.3f' % x for x in row['fastmerge_keep_per_decile'][::3]]} mergekit "
              f"{['%.3f' % x for x in row['mergekit_keep_per_decile'][::3]]}; "
              f"L1 ratio fastmerge {row['l1_ratio_fastmerge']:.4f} mergekit "
              f"{row['l1_ratio_mergekit']:.4f}")
    save(rows, args.out)


if __name__ == "__main__":
    main()

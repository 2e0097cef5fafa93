"""DARE's drop: fastmerge's keep rate and rescale against mergekit's, measured.

    # in an environment with mergekit installed (fastmerge is imported from this checkout)
    python bench/compare_dare_mergekit.py --out bench/results/dare_vs_mergekit.json

Masks are random on both sides (mergekit: torch.bernoulli; fastmerge: Philox4x32-10
keyed by seed and tensor name, docs/spec.md §8a), so they are compared in distribution:
on one fp16 task vector of R × M entries, for several densities and seeds, the keep rate
overall and per magnitude decile of |τ| (DARE ignores magnitude: every decile should
keep d), in binomial standard deviations from d; and the rescaled task vector's L1 norm
relative to the original (fastmerge weighs each kept entry 1/d, exact in expectation;
mergekit 0.1.5 with ``rescale: true`` rescales the tensor back to its L1 norm exactly).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_della_mergekit import (deciles, mean_columns, parse_args, save,  # noqa: E402
                                     task_vector)
from fastmerge import philox  # noqa: E402
from fastmerge.kernel_api import drop_threshold  # noqa: E402


def main() -> None:
    from mergekit.sparsify import RescaleNorm, bernoulli    # LGPL: called, not copied
    args = parse_args(__doc__, rows=256)
    R, M = args.rows, args.cols
    N = R * M
    _, _, tau = task_vector(R, M)
    nz = tau != 0
    # magnitude rank over the whole tensor, for the deciles (DARE has no rows)
    order = torch.argsort(tau.abs(), stable=True)
    rank = torch.empty(N, dtype=torch.int64)
    rank[order] = torch.arange(N)
    rows = []
    for d in (0.1, 0.3, 0.5, 0.9):
        T = drop_threshold(d)
        fm, mk, l1_fm, l1_mk, frac_fm, frac_mk = [], [], [], [], [], []
        for s in range(args.seeds):
            kept = philox.random_words(philox.tensor_key(s, "w"), 0, 0, N) < T
            fm.append(deciles(kept, rank, N, nz))
            frac_fm.append(float(kept[nz].double().mean()))
            out = torch.where(kept, tau.double() / d, 0.0)
            l1_fm.append(float(out.abs().sum() / tau.double().abs().sum()))
            torch.manual_seed(s)
            res = bernoulli(tau.view(R, M), d, rescale_norm=None).reshape(-1)
            mk.append(deciles(res != 0, rank, N, nz))
            frac_mk.append(float((res != 0)[nz].double().mean()))
            torch.manual_seed(s)
            res_l1 = bernoulli(tau.view(R, M), d, rescale_norm=RescaleNorm.l1)
            l1_mk.append(float(res_l1.double().abs().sum() / tau.double().abs().sum()))
        n = int(nz.sum()) * args.seeds
        sigma = math.sqrt(d * (1 - d) / n)            # of the pooled keep fraction
        row = {"density": d, "rows": R, "cols": M, "seeds": args.seeds,
               "nonzero_fraction": float(nz.double().mean()),
               "fastmerge_keep": sum(frac_fm) / len(frac_fm),
               "mergekit_keep": sum(frac_mk) / len(frac_mk),
               "fastmerge_keep_sigmas": (sum(frac_fm) / len(frac_fm) - d) / sigma,
               "mergekit_keep_sigmas": (sum(frac_mk) / len(frac_mk) - d) / sigma,
               "fastmerge_keep_per_decile": mean_columns(fm),
               "mergekit_keep_per_decile": mean_columns(mk),
               "l1_ratio_fastmerge": sum(l1_fm) / len(l1_fm),
               "l1_ratio_fastmerge_range": [min(l1_fm), max(l1_fm)],
               "l1_ratio_mergekit": sum(l1_mk) / len(l1_mk)}
        rows.append(row)
        print(f"d={d}: keep fastmerge {row['fastmerge_keep']:.5f} "
              f"({row['fastmerge_keep_sigmas']:+.2f} σ) mergekit {row['mergekit_keep']:.5f} "
              f"({row['mergekit_keep_sigmas']:+.2f} σ); per decile fastmerge "
              f"{min(row['fastmerge_keep_per_decile']):.4f}–"
              f"{max(row['fastmerge_keep_per_decile']):.4f} mergekit "
              f"{min(row['mergekit_keep_per_decile']):.4f}–"
              f"{max(row['mergekit_keep_per_decile']):.4f}; L1 ratio fastmerge "
              f"{row['l1_ratio_fastmerge']:.4f} mergekit {row['l1_ratio_mergekit']:.4f}")
    save(rows, args.out)


if __name__ == "__main__":
    main()

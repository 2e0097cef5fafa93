"""GPU benchmark of the Triton kernels against the reference backend and the incumbent TIES.

    python bench/bench_triton.py --out bench/results/triton_h100.json
    python bench/bench_triton.py --table bench/results/triton_h100.json   # print a table

Per Llama-2-7B weight shape (4096x4096, 11008x4096, 32000x4096), n models (2, 4), fp16:
  * copy: device-to-device copy bandwidth (torch clone of a 1 GiB tensor), the roofline;
  * triton: the 3 radix histogram launches (prefixes of the real selection), the fused
    merge, thresholds end to end (fastmerge.select.find_thresholds: 3 launches plus the
    host-side digit search) and thresholds + merge together (one whole tensor merged);
  * reference: fastmerge.reference (the torch backend) on the same GPU, in the chunks the
    pipeline gives it (torch_backend.CHUNK_ELEMS), thresholds + merge;
  * incumbent: TIES as mergekit runs it, written here from its description: per model
    τ = θ_i − θ_b in the storage dtype, k = int(density·numel), a full sort of |τ| keeps
    exactly k entries, sign election by the sum of kept τ, disjoint mean and the add to
    θ_b, all in the storage dtype.
Times: triton.testing.do_bench (L2 flushed between runs), median / p20 / p80 in ms.
GB/s counts the bytes a kernel must move (merge: read θ_b and n models, write θ;
histogram: read θ_b and n models, per launch), also as a fraction of the copy bandwidth.
A correctness check (Triton vs reference on random data: thresholds and counters equal,
outputs within 1 ulp) runs first and is recorded in the JSON. Every row carries device,
versions, dtype, shape, n_models and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096), "32000x4096": (32000, 4096),
          "64x64": (64, 64)}
DEVICE = "cuda"
DRY_RUN = False
WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--table", metavar="JSON", help="print a table of an existing results file "
                    "and exit (no GPU needed)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="comma-separated subset of %(default)s")
    ap.add_argument("--n-models", default="2,4", help="comma-separated (default %(default)s)")
    ap.add_argument("--density", type=float, default=0.2, help="TIES density (default 0.2)")
    ap.add_argument("--slack", type=float, default=0.0,
                    help="TIES-SV slack for the Triton and reference runs (default 0: TIES)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference backend")
    ap.add_argument("--no-incumbent", action="store_true", help="skip the incumbent TIES")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the merge over block sizes and the histogram over window "
                         "sizes (first shape, first n) to tune the launch defaults")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep in ms (default 200)")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the script without a GPU: every contender runs once on a 64x64 "
                         "tensor on the CPU (TRITON_INTERPRET=1); the numbers mean nothing")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------
# the contenders

def incumbent_ties(base, models, density, weights):
    """TIES as mergekit computes it (from its description), in the storage dtype.

    τ_i = θ_i − θ_b; keep exactly k = int(density·N) largest |τ_i| (full sort);
    γ = sign(Σ_i w_i·kept τ_i) (0 → +1); θ = θ_b + Σ_i w_i τ_i [sign agrees] / Σ_i w_i [same].
    """
    import torch

    n, N = models.shape
    k = int(density * N)
    w = torch.tensor(weights[:n], dtype=base.dtype, device=base.device).unsqueeze(1)
    tau = models - base.unsqueeze(0)
    trimmed = torch.zeros_like(tau)
    for i in range(n):
        order = torch.argsort(tau[i].abs(), descending=True)[:k]
        trimmed[i, order] = tau[i, order]
    weighted = trimmed * w
    gamma = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(base.dtype)
    agree = torch.sign(trimmed) == gamma
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    den = torch.where(den.abs() < 1e-8, torch.ones_like(den), den)
    return base + num / den


class Contenders:
    """Closures for one (shape, n) case, sharing inputs and thresholds."""

    def __init__(self, base, models, density, slack):
        import torch

        from fastmerge import reference as R
        from fastmerge.backends import torch_backend
        from fastmerge.methods import METHODS
        TIES_SV = METHODS["ties_sv"]
        from fastmerge.kernels import triton_merge as T
        from fastmerge.select import RadixSelect, Targets, find_thresholds

        self.T, self.R, self.torch = T, R, torch
        self.base, self.models = base, models
        self.n, self.N = models.shape
        self.dens, self.slk = [density] * self.n, [slack] * self.n
        self.find_thresholds = find_thresholds
        self.targets = Targets.of(self.dens, self.slk, self.N)
        self.out = torch.empty_like(base)
        self.chunk = torch_backend.CHUNK_ELEMS
        t, u = self.thresholds_triton()
        self.t, self.u = t, u
        self.cfg = TIES_SV.kernel_config(WEIGHTS[:self.n], 1.0, True, "sum", t, u)
        # the prefixes of each level of this selection, for kernel-only histogram timing
        sel = RadixSelect.of(self.targets)
        self.levels = []
        while not sel.done:
            p = sel.prefixes()
            self.levels.append((sel.level, p))
            sel.update(T.histogram(base, models, p, sel.level).cpu())

    # triton
    def thresholds_triton(self):
        return self.find_thresholds(self.T.histogram, lambda: [(self.base, self.models)],
                                    self.targets)

    def hist_triton(self, **launch):
        for level, p in self.levels:
            self.T.histogram(self.base, self.models, p, level, **launch)

    def merge_triton(self, **launch):
        return self.T.merge(self.base, self.models, self.out, self.cfg, **launch)

    def total_triton(self):
        from fastmerge.methods import METHODS
        TIES_SV = METHODS["ties_sv"]
        t, u = self.thresholds_triton()
        cfg = TIES_SV.kernel_config(WEIGHTS[:self.n], 1.0, True, "sum", t, u)
        return self.T.merge(self.base, self.models, self.out, cfg)

    # reference, in the pipeline's chunks
    def _chunks(self):
        return [(self.base[s:s + self.chunk], self.models[:, s:s + self.chunk])
                for s in range(0, self.N, self.chunk)]

    def total_reference(self):
        from fastmerge.methods import METHODS
        TIES_SV = METHODS["ties_sv"]
        t, u = self.find_thresholds(self.R.histogram, self._chunks, self.targets)
        cfg = TIES_SV.kernel_config(WEIGHTS[:self.n], 1.0, True, "sum", t, u)
        for s in range(0, self.N, self.chunk):
            self.R.merge(self.base[s:s + self.chunk], self.models[:, s:s + self.chunk],
                         self.out[s:s + self.chunk], cfg)

    def incumbent(self):
        return incumbent_ties(self.base, self.models, self.dens[0], WEIGHTS)


# ---------------------------------------------------------------------------------------
# measurement

def timed(fn, rep):
    if DRY_RUN:
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"ms_median": ms, "ms_p20": ms, "ms_p80": ms}
    from triton.testing import do_bench
    med, p20, p80 = do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms_median": med, "ms_p20": p20, "ms_p80": p80}


def copy_bandwidth(rep):
    import torch
    x = torch.empty(1 << (16 if DRY_RUN else 29), dtype=torch.float16, device=DEVICE)  # 1 GiB
    x.normal_()
    row = timed(lambda: x.clone(), rep)
    row["bytes"] = 2 * x.numel() * x.element_size()
    row["gbps"] = row["bytes"] / row["ms_median"] / 1e6
    del x
    if not DRY_RUN:
        torch.cuda.empty_cache()
    return row


def correctness_check():
    """Triton vs reference on random data, fp16 / bf16, 3 models, slack on: the spec's bar."""
    import torch

    sys.path.insert(0, str(REPO))
    from fastmerge import reference as R
    from fastmerge.methods import METHODS
    TIES_SV = METHODS["ties_sv"]
    from fastmerge.kernels import triton_merge as T
    from fastmerge.select import Targets, find_thresholds
    from tests.checks import assert_counts_equal, assert_ulp_close

    results = []
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        case = {"dtype": str(dtype).replace("torch.", ""), "N": 1 << (12 if DRY_RUN else 20),
                "n_models": 3}
        try:
            N, n = case["N"], case["n_models"]
            base = (0.02 * torch.randn(N, device=DEVICE, generator=g)).to(dtype)
            tau = 0.002 * torch.randn(n, N, device=DEVICE, generator=g)
            models = (base.float() + tau * torch.tensor([1.0, 2.0, 3.0], device=DEVICE)[:, None]
                      ).to(dtype)
            dens, slk = [0.2] * n, [0.05] * n
            chunks = lambda: [(base, models)]  # noqa: E731
            t, u = find_thresholds(T.histogram, chunks, Targets.of(dens, slk, N))
            tr, ur = find_thresholds(R.histogram, chunks, Targets.of(dens, slk, N))
            assert (t, u) == (tr, ur), f"thresholds differ: {(t, u)} vs {(tr, ur)}"
            w = (1.0, 0.5, 1.25)
            cfg = TIES_SV.kernel_config(w, 1.0, True, "sum", t, u)
            out, ref = torch.empty_like(base), torch.empty_like(base)
            counts = T.merge(base, models, out, cfg)
            want = R.merge(base, models, ref, cfg)
            assert_counts_equal(counts, want)
            wt = torch.tensor(w, dtype=torch.float64, device=DEVICE)[:, None]
            # operands of the fp32 evaluation (tests/checks.py): |θ_b| + Σ|w_i τ_i| / min w_i
            scale = ((wt * R.task_vectors(base, models).double()).abs().sum(0) / min(w)
                     + base.double().abs())
            assert_ulp_close(out, ref, operand_scale=scale)
            case["ok"] = True
        except Exception as exc:  # recorded, not raised: the timings are still of interest
            case["ok"] = False
            case["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        results.append(case)
    return {"ok": all(c["ok"] for c in results), "cases": results}


def meta():
    import torch
    import triton
    name = "CPU (dry run, TRITON_INTERPRET=1)" if DRY_RUN else torch.cuda.get_device_name()
    return {"device": name, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run(args):
    import torch
    if not DRY_RUN and not torch.cuda.is_available():
        sys.exit("bench_triton.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "--dry-run checks the script on the CPU")
    sys.path.insert(0, str(REPO))
    info = meta()
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}", flush=True)
    correct = correctness_check()
    print(f"correctness: {'ok' if correct['ok'] else 'FAILED'}", flush=True)
    copy = copy_bandwidth(args.rep)
    print(f"copy bandwidth: {copy['gbps']:.0f} GB/s", flush=True)

    rows = []
    dtype = torch.float16
    elem = torch.finfo(dtype).bits // 8
    for shape_name in args.shapes.split(","):
        rows_, cols = SHAPES[shape_name]
        N = rows_ * cols
        for n in (int(v) for v in args.n_models.split(",")):
            g = torch.Generator(device=DEVICE).manual_seed(n)
            base = (0.02 * torch.randn(N, device=DEVICE, generator=g)).to(dtype)
            scale = torch.tensor([0.002 * (i + 1) for i in range(n)], device=DEVICE)[:, None]
            models = (base.float() + scale * torch.randn(n, N, device=DEVICE, generator=g)
                      ).to(dtype)
            c = Contenders(base, models, args.density, args.slack)
            common = dict(info, dtype="fp16", shape=shape_name, numel=N, n_models=n,
                          density=args.density, slack=args.slack)
            read = (n + 1) * N * elem
            merge_bytes = read + N * elem
            hist_bytes = read * len(c.levels)
            case = {}
            plan = [("triton_histogram_x3", c.hist_triton, hist_bytes),
                    ("triton_merge", c.merge_triton, merge_bytes),
                    ("triton_thresholds_e2e", c.thresholds_triton, hist_bytes),
                    ("triton_total", c.total_triton, hist_bytes + merge_bytes)]
            if not args.no_reference:
                plan.append(("reference_total", c.total_reference, hist_bytes + merge_bytes))
            if not args.no_incumbent:
                plan.append(("incumbent_total", c.incumbent, merge_bytes))
            for name, fn, nbytes in plan:
                row = dict(common, name=name, bytes=nbytes, **timed(fn, args.rep))
                row["gbps"] = nbytes / row["ms_median"] / 1e6
                row["frac_copy_bw"] = row["gbps"] / copy["gbps"]
                case[name] = row
                rows.append(row)
                print(f"{shape_name:>11} n={n} {name:<22} {row['ms_median']:9.3f} ms "
                      f"{row['gbps']:7.0f} GB/s ({row['frac_copy_bw']:.0%} of copy)", flush=True)
            total = case["triton_total"]["ms_median"]
            for other in ("reference_total", "incumbent_total"):
                if other in case:
                    case["triton_total"][f"speedup_vs_{other.split('_')[0]}"] = \
                        case[other]["ms_median"] / total
            if "incumbent_total" in case:   # how often the two TIES agree bit for bit
                c.total_triton()
                same = c.incumbent() == c.out
                case["incumbent_total"]["frac_outputs_equal_to_triton"] = float(
                    same.float().mean())
            if args.sweep and not any(r.get("sweep") for r in rows):
                rows += sweep(c, common, merge_bytes, read, copy["gbps"], args.rep)
            del c, base, models
            if not DRY_RUN:
                torch.cuda.empty_cache()
    return {"meta": info, "correctness": correct, "copy_bandwidth": copy, "rows": rows}


def sweep(c, common, merge_bytes, read, copy_gbps, rep):
    """Merge over block sizes, one histogram launch per level over window sizes."""
    rows = []
    for block in (256, 512, 1024, 2048):
        row = dict(common, name="triton_merge", sweep=f"block={block}", bytes=merge_bytes,
                   **timed(lambda: c.merge_triton(block=block), rep))
        rows.append(row)
    for window in (32, 64, 128, 256):
        for level, p in c.levels:
            row = dict(common, name=f"triton_histogram_level{level}",
                       sweep=f"window={window}", bytes=read,
                       **timed(lambda: c.T.histogram(c.base, c.models, p, level,
                                                     window=window), rep))
            rows.append(row)
    for row in rows:
        row["gbps"] = row["bytes"] / row["ms_median"] / 1e6
        row["frac_copy_bw"] = row["gbps"] / copy_gbps
        print(f"sweep {row['name']:<26} {row['sweep']:<11} {row['ms_median']:9.3f} ms "
              f"{row['gbps']:7.0f} GB/s", flush=True)
    return rows


def table(results) -> str:
    """A Markdown table of a results JSON."""
    m = results["meta"]
    lines = [f"{m['device']}, torch {m['torch']}, triton {m['triton']}, {m['date']}; "
             f"copy {results['copy_bandwidth']['gbps']:.0f} GB/s; correctness "
             f"{'ok' if results['correctness']['ok'] else 'FAILED'}", "",
             "| shape | n | contender | sweep | median ms (p20-p80) | GB/s | of copy | "
             "speedup vs incumbent | vs reference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        sp_i = r.get("speedup_vs_incumbent")
        sp_r = r.get("speedup_vs_reference")
        lines.append(
            f"| {r['shape']} | {r['n_models']} | {r['name']} | {r.get('sweep', '')} | "
            f"{r['ms_median']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f}) | {r['gbps']:.0f} | "
            f"{r['frac_copy_bw']:.0%} | {'' if sp_i is None else f'{sp_i:.1f}x'} | "
            f"{'' if sp_r is None else f'{sp_r:.1f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    global DEVICE, DRY_RUN
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"     # before triton is imported
        DEVICE, DRY_RUN = "cpu", True
        args.shapes, args.n_models = "64x64", "2"
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    results = run(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    print(table(results))
    return 0 if results["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

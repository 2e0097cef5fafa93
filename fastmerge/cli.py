"""Command line: ``fastmerge merge CONFIG.yml OUTPUT_DIR``, ``fastmerge demo``, ``fastmerge verify DIR``.

Help texts are plain text (argparse prints them as written). Messages of the Python API
that name a keyword (``overwrite=True (CLI: --overwrite)``) are reworded to the option.
Ctrl-C during a merge exits with 130 after one line saying what was kept and how to
resume; a closed stdout (``fastmerge demo | head -3``) ends the run quietly.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import re
import shlex
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .errors import FastmergeError, ParameterError

DESCRIPTION = ("Fast, exact merging of LLM checkpoints in the Hugging Face safetensors "
               "format: TIES, TIES-SV, DARE, breadcrumbs, DELLA, SLERP, NuSLERP, model "
               "stock, task arithmetic, linear.")
EPILOG = ("Run 'fastmerge COMMAND --help' for a command's options. The Python API is "
          "fastmerge.merge(); docs/spec.md defines every method and config key.")
# fastmerge.testing.PRESETS, listed here so that --help does not import PyTorch (a test
# checks that they agree)
DEMO_PRESETS = {"tiny": "124k parameters", "small": "27M", "1b": "1.1B",
                "7b": "6.7B, about 40 GB of disk"}
# --extended-vocab: tokens the CT model adds (1b/7b: a 57k-token CT, as Yak-Llama2's 56,724)
DEMO_NEW_TOKENS = {"tiny": 64, "small": 2048, "1b": 24724, "7b": 24724}
BACKEND_CHOICES = ("auto", "triton", "c", "torch")   # fastmerge.backends.BACKENDS + auto
INTERRUPTED = 130                                     # 128 + SIGINT, as shells report it


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (their lists keep their lines)."""


class _VersionAction(argparse.Action):
    """``--version``: the version and which backends can run here."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def version_text() -> str:
    """``fastmerge --version``: version, Python / PyTorch / CUDA, and each backend's state
    (fastmerge.backends.load, which says why one cannot run)."""
    import platform

    import torch

    from . import __version__, backends
    cuda = torch.cuda.is_available()
    lines = [f"fastmerge {__version__}",
             f"Python {platform.python_version()}, torch {torch.__version__}, " +
             (f"CUDA {torch.version.cuda} ({torch.cuda.device_count()} device(s))" if cuda
              else "no CUDA device")]
    usable = {}
    details = {"c": "C extension fastmerge._cmerge built",
               "triton": ("on CUDA" if cuda else
                          "interpreter on the CPU (TRITON_INTERPRET=1), slow"),
               "torch": "PyTorch reference"}
    lines.append("backends:")
    for name in ("triton", "c", "torch"):
        try:
            backends.load(name)
            usable[name] = True
            lines.append(f"  {name:<7} usable ({details[name]})")
        except FastmergeError as exc:
            usable[name] = False
            reason = str(exc).removeprefix(f"backend {name!r} is unavailable: ")
            lines.append(f"  {name:<7} not usable: {reason}")
    preferred = "triton" if cuda else "c"
    auto = preferred if usable[preferred] else "torch"
    lines.append(f"--backend auto picks: {auto} (device {'cuda' if cuda else 'cpu'})")
    return "\n".join(lines)


def _merge_epilog() -> str:
    """merge --help: the methods and the YAML keys, from the method table and the loader."""
    from . import config, methods

    def wrapped(head: str, items) -> list[str]:
        return textwrap.wrap(", ".join(items), width=88, initial_indent=f"  {head:<22}",
                             subsequent_indent=" " * 24)

    usable = [m for m in methods.METHODS.values() if m.name in methods.ALIASES]
    coming = [m.name for m in methods.METHODS.values() if m.name not in methods.ALIASES]
    lines = ["methods (merge_method; any letter case):"]
    lines += [f"  {m.name:<22}{m.summary}" for m in usable]
    if coming:   # declared in the method table, not accepted yet
        lines += wrapped("not yet available:", coming)
    lines += ["", "config keys (mergekit's format and meaning; unknown keys are errors):"]
    lines += wrapped("top level:", sorted(config.TOP_KEYS))
    lines += wrapped("tokenizer:", sorted(config.TOKENIZER_KEYS))
    lines += wrapped("models[i]:", sorted(config.MODEL_KEYS))
    lines += wrapped("models[i].parameters:", sorted(config.MODEL_PARAMS))
    lines += wrapped("parameters:", sorted(config.GLOBAL_PARAMS))
    lines += ["", "knobs: a number, a gradient over the layers [a, b, ...] or filters",
              "[{filter: mlp, value: 0.5}, {value: 0.2}]; a model's own value wins over the",
              "global one under parameters:"]
    for k in methods.KNOBS.values():
        default = ("required" if k.yaml_default is methods.REQUIRED
                   else f"default {float(k.yaml_default)}")
        where = "" if k.per_model else "; under parameters only"
        lines += textwrap.wrap(f"{k.doc} ({default}{where})", width=88,
                               initial_indent=f"  {k.yaml:<22}", subsequent_indent=" " * 24)
    lines += ["",
              "example:",
              "  merge_method: ties_sv",
              "  base_model: meta-llama/Llama-2-7b-hf",
              "  models:",
              "    - model: ./llama-2-7b-tamil-ct",
              "      parameters: {weight: 1.0, density: 0.2}",
              "    - model: meta-llama/Llama-2-7b-chat-hf",
              "      parameters: {weight: 1.0, density: 0.2, slack: 0.05}",
              "  dtype: float16",
              "",
              "docs/spec.md defines every method (section 8) and key (sections 2 and 11).",
              "Ctrl-C keeps the completed shards in .OUTPUT_DIR.partial: rerun with --resume "
              "to continue.",
              "Several processes, GPUs or nodes: torchrun --nproc-per-node N -m fastmerge merge "
              "CONFIG OUT",
              "(each rank writes its share of the shards; the output is the same bytes; "
              "section 14)."]
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if present, default), cpu, cuda or cuda:i")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="auto (default: triton on CUDA, c on CPU, else torch), triton, c, or "
                        "torch (the PyTorch reference)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastmerge", description=DESCRIPTION, epilog=EPILOG)
    ap.add_argument("--version", action=_VersionAction,
                    help="print the version and which backends can run here, and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("merge", help="merge the checkpoints a YAML config names",
                       description="Merge the checkpoints a YAML config (mergekit's format) "
                                   "names into OUTPUT_DIR,\na sharded safetensors checkpoint "
                                   "with config, tokenizer and fastmerge_report.json.",
                       epilog=_merge_epilog(), formatter_class=_Formatter)
    m.add_argument("config", metavar="CONFIG.yml",
                   help="YAML config: merge_method, base_model, models, parameters, dtype "
                        "(keys below)")
    m.add_argument("output", metavar="OUTPUT_DIR",
                   help="output folder; it must not exist (an empty folder is fine) unless "
                        "--overwrite; a missing parent folder is created")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT_DIR, or start an interrupted merge over "
                        "(deleting the completed shards it kept)")
    m.add_argument("--resume", action="store_true",
                   help="continue an interrupted merge into OUTPUT_DIR from the completed "
                        "shards kept in .OUTPUT_DIR.partial (each checked by sha256); the "
                        "result is byte-identical to an uninterrupted run")
    m.add_argument("--random-seed", "--seed", dest="seed", type=int, default=0, metavar="N",
                   help="seed of the DARE methods' random drop (default 0; mergekit's "
                        "option name); the drop is the same on every backend and resume")
    m.add_argument("--shard-size", default="5GB", metavar="SIZE",
                   help="largest shard, e.g. 5GB (default), 500MB, 2GiB")
    m.add_argument("--allow-pickle", action="store_true",
                   help="also read .bin/.pt checkpoints, with torch.load(weights_only=True) "
                        "(refused by default: unpickling can run code)")
    m.add_argument("--allow-nonfinite", action="store_true",
                   help="merge tensors holding NaN/Inf instead of stopping")
    m.add_argument("--config-from", default=None, metavar="MODEL",
                   help="whose config.json, tokenizer settings and chat template the output "
                        "gets: base, or a model as the config names it (overrides the "
                        "config's config_from)")
    _common(m)

    v = sub.add_parser("verify", help="check a finished output: index, shard headers, and "
                                      "each shard's sha256 against the report",
                       description="Check a finished fastmerge output: the index agrees with "
                                   "the shard headers, every header is valid, and every "
                                   "shard's sha256 equals the one in fastmerge_report.json.")
    v.add_argument("output", metavar="OUTPUT_DIR", help="merged checkpoint folder")

    sub.add_parser("report", add_help=False,
                   help="read a merge's report: totals and a table per module type or layer "
                        "(--by layer), two merges side by side (--compare OTHER_DIR), a plot "
                        "per layer (--plot FILE.png); see fastmerge report --help")

    d = sub.add_parser("demo", help="build small Llama-shaped base/CT/SFT checkpoints, merge "
                                    "them with TIES-SV, print the report",
                       description="Build Llama-shaped base, CT and SFT checkpoints (no "
                                   "downloads), merge them with TIES-SV and print the report.")
    d.add_argument("--preset", default="tiny", choices=list(DEMO_PRESETS),
                   help="checkpoint size: " + ", ".join(f"{k} ({v})" for k, v in
                                                      DEMO_PRESETS.items()) +
                        "; default tiny")
    d.add_argument("--workdir", default=None, metavar="DIR",
                   help="keep the checkpoints and the merged model in DIR (default: a "
                        "temporary folder, removed on exit)")
    d.add_argument("--density", type=float, default=0.2, metavar="D",
                   help="density d of both models: the fraction of each task vector's "
                        "entries the trim keeps, in [0, 1] (default 0.2)")
    d.add_argument("--slack", type=float, default=0.05, metavar="S",
                   help="slack s of both models: the fraction of each model's largest "
                        "entries protected from the sign election, in [0, density] "
                        "(default 0.05)")
    d.add_argument("--extended-vocab", action="store_true",
                   help="the CT model extends the base's vocabulary with tokens of a second "
                        "script and the SFT model adds chat tokens; merged with "
                        "tokenizer_source union and the SFT's config and chat template "
                        "(docs/spec.md §13)")
    _common(d)
    return ap


def _model_legend(message: str, models: list) -> str:
    """' (model 0 is ./ct)' for the 'model i' a message names (i counts the merged models)."""
    named = sorted({int(i) for i in re.findall(r"\bmodel (\d+)\b", message)})
    parts = [f"model {i} is {models[i]}" for i in named if i < len(models)]
    return f" ({'; '.join(parts)})" if parts else ""


def cmd_merge(args) -> int:
    from . import backends
    from .config import load_config
    from .output import parse_size

    kwargs = load_config(args.config)
    if args.config_from is not None:
        kwargs.pop("config_from", None)
        if args.config_from != "base":
            kwargs["config_from"] = args.config_from
    # the options' own errors, before the config's (which name the config file)
    try:
        parse_size(args.shard_size)
    except ParameterError as exc:
        raise ParameterError(f"--shard-size: {exc}") from None
    from . import distributed
    if distributed.launched():      # one of several ranks (torchrun): docs/spec.md §14
        return _merge_ranks(args, kwargs)
    backends.resolve(args.backend, args.device)
    gc.freeze()   # the import-time objects (PyTorch's) need no more garbage collection scans
    atexit.register(gc.unfreeze)   # ...but at exit they must be collectable: Triton's
                                   # nanobind bindings report uncollected objects as leaks
    t0 = time.perf_counter()
    _report(args, _run_merge(args, kwargs), t0)
    return 0


def _run_merge(args, kwargs, who: str = ""):
    """fastmerge.merge() with the config's arguments and the command line's options; a
    parameter error names the config file (and ``who``: a rank) and the models."""
    from .api import merge
    try:
        return merge(**kwargs, output=args.output, overwrite=args.overwrite,
                     shard_size=args.shard_size, allow_pickle=args.allow_pickle,
                     allow_nonfinite=args.allow_nonfinite, resume=args.resume,
                     device=args.device, backend=args.backend, seed=args.seed,
                     progress=not args.no_progress)
    except ParameterError as exc:
        raise ParameterError(f"{who}{args.config}: {exc}"
                             f"{_model_legend(str(exc), kwargs['models'])}") from exc


def _report(args, result, t0: float) -> None:
    """What ``fastmerge merge`` prints: resumed shards, the summary, each rank's work."""
    from .report import summary
    if args.resume:
        print(f"resumed {result.shards_resumed} of {result.shards_total} shards")
    print(summary(result.report))
    for w in result.ranks or ():
        print(f"rank {w['rank']} ({w['host']}): {w['shards']} shards, "
              f"{w['bytes_written'] / 1e9:.2f} GB in {w['seconds']:.1f} s")
    ranks = f" on {len(result.ranks)} ranks" if result.ranks else ""
    print(f"wrote {result.path} in {time.perf_counter() - t0:.1f} s{ranks}")


def _merge_ranks(args, kwargs) -> int:
    """``torchrun ... -m fastmerge merge CONFIG OUT``: this process is one rank. The
    process group comes from torchrun's variables; SIGTERM (torchrun stopping every rank
    when one fails) ends the merge like Ctrl-C, keeping the completed shards; only rank
    0 prints the summary, and every rank prints its errors with its rank."""
    import signal

    from . import distributed

    distributed.init_from_env(args.device)

    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM: torchrun stops every rank when one fails")
    previous = signal.signal(signal.SIGTERM, stop)
    t0 = time.perf_counter()
    rank = f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}"
    try:
        try:
            result = _run_merge(args, kwargs, f"{rank}: ")
        except FastmergeError as exc:
            if str(exc).startswith(rank):
                raise
            raise type(exc)(f"{rank}: {exc}") from exc
        if os.environ.get("RANK") == "0":
            _report(args, result, t0)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.finalize()


def cmd_demo(args) -> int:
    from . import backends
    from .params import make_params

    # every argument is checked before the checkpoints are built
    try:
        make_params("ties_sv", 2, density=args.density, slack=args.slack)
    except ParameterError as exc:
        raise ParameterError(f"demo --density {args.density} --slack {args.slack}: "
                             f"{exc}") from None
    backends.resolve(args.backend, args.device)

    from .api import merge
    from .report import summary
    from .testing import PRESETS, write_llama_family

    keep = args.workdir is not None
    with tempfile.TemporaryDirectory(prefix="fastmerge-demo-") as tmp:
        root = Path(args.workdir).expanduser() if keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        vocab = {}
        if args.extended_vocab:
            from .testing import write_extended_vocab_family
            fam = write_extended_vocab_family(root / "inputs", config=PRESETS[args.preset],
                                              new_tokens=DEMO_NEW_TOKENS[args.preset])
            paths = {"base": fam["base"], "models": [fam["ct"], fam["sft"]]}
            vocab = dict(tokenizer_source="union", config_from=1)
        else:
            paths = write_llama_family(root / "inputs", config=PRESETS[args.preset],
                                       n_models=2, names=("base", "ct", "sft"))
        where = (f" under {root / 'inputs'}" if keep else
                 " in a temporary folder (removed on exit; --workdir DIR keeps them)")
        print(f"built base + CT + SFT checkpoints ({args.preset}) in "
              f"{time.perf_counter() - t0:.1f} s{where}")
        t0 = time.perf_counter()
        result = merge(paths["base"], paths["models"], method="ties_sv", density=args.density,
                       slack=args.slack, output=root / "merged", overwrite=True,
                       device=args.device, backend=args.backend,
                       progress=not args.no_progress, **vocab)
        print(f"merged with TIES-SV (density {args.density}, slack {args.slack}) in "
              f"{time.perf_counter() - t0:.2f} s" + (f" -> {result.path}" if keep else ""))
        print(summary(result.report))
        if keep:
            print(f"the full report: {result.path / 'fastmerge_report.json'} "
                  f"(fastmerge report {result.path} --by layer)")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify_output

    s = verify_output(args.output)
    print(f"ok: {s['path']}: {s['shards']} shards, {s['tensors']} tensors, {s['bytes']:,} "
          "bytes; index, headers and sha256 match the report")
    return 0


COMMANDS = {"merge": cmd_merge, "demo": cmd_demo, "verify": cmd_verify}
_CLI_FLAGS = ("overwrite", "resume", "allow_pickle", "allow_nonfinite")


def cli_wording(message: str) -> str:
    """The API's 'pass overwrite=True (CLI: --overwrite)' as the command line says it:
    'pass --overwrite'."""
    message = re.sub(r"\b\w+=True \(CLI: (--[\w-]+)\)", r"\1", message)
    return re.sub(rf"\b({'|'.join(_CLI_FLAGS)})=True\b",
                  lambda m: "--" + m.group(1).replace("_", "-"), message)


def _interrupted(args, exc: KeyboardInterrupt) -> str:
    """The one line printed after Ctrl-C: what was kept and how to continue."""
    partial = getattr(exc, "partial", None)
    if args.command != "merge" or not hasattr(exc, "shards_done"):
        return "fastmerge: interrupted"
    argv = list(args.argv) + ([] if args.resume else ["--resume"])
    from .distributed import launched
    if launched():                   # one rank of several: the others stop too
        why = str(exc.__cause__ or "") or "interrupted"
        return (f"fastmerge: rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')}: "
                f"stopped ({why}); the completed shards of every rank are kept in "
                f"{partial}; continue with the same launch of: fastmerge {shlex.join(argv)}")
    if partial is None:
        return ("fastmerge: interrupted before the first shard was complete; nothing was "
                "kept")
    from .output import format_size
    return (f"fastmerge: interrupted; {exc.shards_done} of {exc.shards_total} shards are "
            f"complete ({format_size(exc.bytes_done)}) and kept in {partial}; continue with: "
            f"fastmerge {shlex.join(argv)}")


def _stdout_to_devnull() -> None:
    """After a closed pipe: send what is left for stdout nowhere, so the flush at exit
    does not fail again (the idiom of Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass


def main(argv=None) -> int:
    # This process runs fastmerge's kernels and little else: OpenMP threads that spin after
    # every parallel region (libgomp's default) only take CPU from the reader and writer
    # threads. OpenMP reads this once, when PyTorch loads it (not yet: fastmerge and this
    # module import it lazily); a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["report"]:          # its own parser: fastmerge.report.main
        from .report import main as report_main
        return report_main(argv[1:])
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        rc = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the flush at exit
        return rc
    except FastmergeError as exc:
        print(f"fastmerge: error: {cli_wording(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(_interrupted(args, exc), file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # stdout closed early (fastmerge demo | head -3): not an error
        _stdout_to_devnull()
        return 1


if __name__ == "__main__":
    sys.exit(main())

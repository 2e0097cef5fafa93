"""``fastmerge.merge()``: the one entry point behind the CLI, the demo and the benchmarks."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import backends
from .errors import InputError, OutputError, ParameterError
from .params import make_params


@dataclass
class MergeResult:
    """What a merge written to disk returns: the output folder and the report."""

    path: Path
    report: dict


def merge(base, models, *, method: str = "ties_sv", weights=None, density=None, slack=None,
          scale=None, normalize: bool | None = None, elect: str = "sum",
          scope: str = "tensor", output=None, dtype=None, device="auto", backend="auto",
          progress: bool = True, shard_size="5GB", overwrite: bool = False,
          allow_nonfinite: bool = False, allow_pickle: bool = False, config_from=None,
          resume: bool = False):
    """Merge ``models`` into ``base`` (docs/spec.md), streaming tensor by tensor.

    base, models: Hugging Face model folders, ``.safetensors`` files, hub ids, or
        in-memory state dicts (``base`` may be None for ``method="linear"``).
    method: one of fastmerge.methods.METHODS (linear, task_arithmetic, ties, ties_sv).
    weights, density, slack: one value, or one value per model (w_i, d_i, s_i); a value
        is a number, or as in mergekit a gradient over the layers ([0, 0.5, 1]) or a
        list of {"filter": substring, "value": ...} entries. Omitted: weights 1.0,
        density 0.2, slack 0.0 (the API's defaults; a YAML config takes mergekit's).
    scale: λ (default 1.0; a number, gradient or filter list too);
        normalize: divide by the selected weights (None: the method's default); elect: "sum" or
        "count"; scope: "tensor" (per-tensor top-k) or "model" (one global top-k per model).
    output: folder to write a sharded checkpoint to; returns ``MergeResult(path, report)``.
        Without it, returns ``(state_dict, report)``.
    dtype: output dtype (default: each tensor's base dtype). device / backend: "auto"
        picks Triton on CUDA, the C extension on CPU, else the PyTorch reference.
    config_from: which input's config/tokenizer files to copy: None (the base), or an
        index into ``models``.
    resume: continue an interrupted merge into the same ``output`` from its verified
        completed shards (the result is byte-identical to an uninterrupted run).
    """
    from .io.checkpoint import Checkpoint
    from .output import CheckpointWriter, MemorySink, check_output_location, parse_size
    from .pipeline import Inputs, StreamMerge
    from .plan import plan_merge
    from .report import build_report

    if isinstance(models, (str, os.PathLike, dict)):
        models = [models]
    models = list(models)
    params = make_params(method, len(models), weights=weights, density=density, slack=slack,
                         scale=scale, normalize=normalize, elect=elect, scope=scope,
                         dtype=dtype, allow_nonfinite=allow_nonfinite)
    if base is None and params.spec.needs_base:
        raise ParameterError(f"method {params.method!r} needs a base model; only 'linear' "
                             "works without one")
    if config_from is not None and (isinstance(config_from, bool) or
                                    not isinstance(config_from, int) or
                                    not 0 <= config_from < len(models)):
        raise ParameterError(f"config_from must be None (the base) or a model index in "
                             f"0..{len(models) - 1}, got {config_from!r}")
    shard_bytes = parse_size(shard_size)
    if output is not None:
        output = Path(output)
        check_output_location(output, [], overwrite)
    elif resume:
        raise ParameterError("resume=True needs an output folder")
    module, dev = backends.resolve(backend, device)
    backends.check_supported(module, params)

    opened = []
    try:
        base_ckpt = None
        if base is not None:
            base_ckpt = Checkpoint.open(base, allow_pickle=allow_pickle, label=None)
            opened.append(base_ckpt)
        model_ckpts = []
        for m in models:
            model_ckpts.append(Checkpoint.open(m, allow_pickle=allow_pickle))
            opened.append(model_ckpts[-1])
        tasks = plan_merge(base_ckpt, model_ckpts, params)
        backends.check_supported(module, params, {t.out_dtype for t in tasks if t.merged})
        inputs = Inputs(base_ckpt, model_ckpts)

        if output is None:
            sink = MemorySink()
        else:
            roots = [c.root for c in opened if c.root is not None]
            output = check_output_location(output, roots, overwrite)
            fingerprint = _fingerprint(params, module.NAME, opened, tasks, shard_bytes)
            sink = CheckpointWriter(output, tasks, shard_bytes, overwrite, resume,
                                    fingerprint).open()
        bar = _progress_bar(tasks, progress)
        try:
            engine = StreamMerge(inputs, tasks, params, module, dev, sink, progress=bar)
            stats = engine.run()
            report = build_report(params, module.NAME,
                                  None if base_ckpt is None else base_ckpt.label,
                                  [c.label for c in model_ckpts], stats,
                                  engine.global_thresholds)
            if output is None:
                return sink.state_dict, report
            source = base_ckpt if config_from is None else model_ckpts[config_from]
            if source is None:
                source = model_ckpts[0]
            path = sink.finish(report, _config_files(source, params.dtype, sink.partial))
            return MergeResult(path, report)
        except (OSError, KeyboardInterrupt) as exc:
            if output is not None:  # resumable: keep the completed shards, hidden
                sink.abort(keep_partial=True)
                if isinstance(exc, OSError):
                    raise OutputError(f"merge into {output} failed: {exc}; completed shards "
                                      f"are kept in {sink.partial} — rerun with resume=True "
                                      "(CLI: --resume) to continue") from exc
            raise
        except BaseException:
            if output is not None:
                sink.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
    finally:
        for c in opened:
            c.close()


def _fingerprint(params, backend: str, checkpoints, tasks, shard_bytes: int) -> str:
    """Identity of a merge's inputs, parameters and output plan (checked on resume)."""
    import hashlib

    from . import __version__
    doc = {"version": __version__, "backend": backend, "params": params.as_dict(),
           "shard_bytes": shard_bytes,
           "tasks": [(t.name, str(t.out_dtype), t.shape, t.merged, t.knobs) for t in tasks],
           "inputs": [(c.label, [(n, str(c.info(n).dtype), tuple(c.info(n).shape),
                                  c.info(n).offset, c.info(n).nbytes) for n in c.names])
                      for c in checkpoints]}
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()


def _config_files(ckpt, dtype, partial: Path) -> list[Path]:
    """Files to copy into the output; config.json gets its dtype updated when it changed."""
    files = list(ckpt.files_to_copy()) if ckpt.root is not None else []
    out = []
    for f in files:
        if f.name == "config.json" and dtype is not None:
            try:
                cfg = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise InputError(f"{f}: cannot read config.json: {exc}") from exc
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = dtype
            (partial / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            continue
        out.append(f)
    return out


def _progress_bar(tasks, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=sum(t.nbytes for t in tasks), unit="B", unit_scale=True,
                desc="merging", leave=False)

"""``fastmerge verify DIR``: check a finished merge output against its own report.

Checks: the index is valid JSON naming plain shard files inside DIR; every shard's
header is valid (fastmerge.io's untrusted-file checks); the index and the shard headers
agree tensor for tensor; the sha256 of every shard equals what fastmerge_report.json
recorded when it was written.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .output import INDEX_NAME, REPORT_NAME, _sha256_file


def verify_output(path) -> dict:
    """Raise InputError naming the first problem found; return a summary when all is well."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    index = _load_json(root / INDEX_NAME)
    report = _load_json(root / REPORT_NAME)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{root / INDEX_NAME}: no weight_map")
    recorded = report.get("shards") if isinstance(report, dict) else None
    if not isinstance(recorded, dict):
        raise InputError(f"{root / REPORT_NAME}: no shard checksums recorded")

    from .io.safetensors_file import SafetensorsFile

    by_shard: dict[str, set] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard \
                or shard in (".", ".."):
            raise InputError(f"{root / INDEX_NAME}: tensor {tensor!r} maps to an unsafe "
                             f"file name {shard!r}")
        by_shard.setdefault(shard, set()).add(tensor)
    if set(by_shard) != set(recorded):
        raise InputError(f"{root}: index names shards {sorted(by_shard)} but the report "
                         f"recorded {sorted(recorded)}")
    total = 0
    for shard, names in sorted(by_shard.items()):
        file = root / shard
        if not file.is_file():
            raise InputError(f"{file}: shard named in the index is missing")
        with SafetensorsFile(file) as sf:
            present = set(sf.tensors)
            total += sum(i.nbytes for i in sf.tensors.values())
        if present != names:
            diff = sorted(present ^ names)
            raise InputError(f"{file}: tensors differ from the index, e.g. {diff[0]!r}")
        digest = _sha256_file(file)
        if digest != recorded[shard]:
            raise InputError(f"{file}: sha256 {digest} differs from the recorded "
                             f"{recorded[shard]} (the file changed or is corrupt)")
    return {"path": str(root), "shards": len(by_shard), "tensors": len(weight_map),
            "bytes": total}


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing (not a finished fastmerge output)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable or invalid JSON: {exc}") from None

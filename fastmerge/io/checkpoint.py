"""One input model, opened lazily and safely: ``Checkpoint.open(source)``.

A source is a Hugging Face model folder (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), a single ``.safetensors`` file, an in-memory state dict
(name -> tensor), or a hub id (``org/name`` or ``name``) that is not a local path,
resolved with ``huggingface_hub.snapshot_download`` (from the local cache when
``HF_HUB_OFFLINE=1``).

Every file is treated as hostile. Shard headers are validated by ``SafetensorsFile``; the
index must map every tensor to a plain file name inside the folder (no ``..``, absolute
path or separator; Hugging Face cache symlinks are followed after the name is checked),
and the index and the shard headers must agree tensor for tensor. Pickle checkpoints
(``*.bin``, ``*.pt``, ``*.pth``) are refused unless ``allow_pickle=True``.

Only headers are read when opening. Data is read on demand with ``read_into``; at most
``MAX_OPEN_FILES`` shard descriptors per checkpoint stay open (least recently used are
closed and reopened later, after checking the file is unchanged).
"""
from __future__ import annotations

import fnmatch
import os
import re
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import InputError
from .safetensors_file import (DTYPE_CODES, SafetensorsFile, TensorInfo, _short, byte_view,
                               check_range, loads_strict_json)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
MAX_OPEN_FILES = 4
JSON_LIMIT = 64 * 1024 * 1024
"""Largest index / config JSON read (bytes)."""
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
COPY_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                 "chat_template.jinja", "chat_template.json")
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_LOCAL_SUFFIXES = (".safetensors", ".json") + PICKLE_SUFFIXES

_PICKLE_REFUSED = (
    "refusing to load a pickle checkpoint: unpickling can execute arbitrary code hidden in "
    "the file. Use a .safetensors version of the model, or, only if you trust the file, pass "
    "allow_pickle=True (CLI: --allow-pickle), which loads it with torch.load(weights_only="
    "True, mmap=True) and holds the whole model in memory")


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``name`` as the Hugging Face hub spells repository ids."""
    return (bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text
            and not text.endswith((".", "-")) and not text.lower().endswith(_LOCAL_SUFFIXES))


class Checkpoint:
    """One input model. Use ``Checkpoint.open``; close it (or use ``with``) when done.

    label: the path or hub id, for messages. root: the model folder, or None for a single
    file or an in-memory state dict. names: tensor names in storage order.
    """

    def __init__(self, label: str, root: Path | None, infos: dict[str, TensorInfo],
                 sources: dict, files: list[SafetensorsFile]):
        self.label = label
        self.root = root
        self._infos = infos
        self._sources = sources  # name -> SafetensorsFile or torch.Tensor
        self._files = files
        self._open_lru: OrderedDict[int, SafetensorsFile] = OrderedDict()
        self._lock = threading.Lock()
        self._config = None
        self._config_loaded = False
        for f in files:  # at most MAX_OPEN_FILES descriptors from here on
            self._touch(f)

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, source, *, allow_pickle: bool = False, label: str | None = None
             ) -> "Checkpoint":
        """Open ``source`` (folder, .safetensors file, state dict or hub id).

        allow_pickle: accept pickle checkpoints (``pytorch_model.bin``, ``*.bin``, ``*.pt``,
            ``*.pth``), loaded only with ``torch.load(weights_only=True, mmap=True)``, which
            refuses pickles that construct anything but tensors. This opt-in holds the model
            in memory (mapped from the file) instead of streaming it.
        label: name used in messages (default: the path or hub id).
        """
        if isinstance(source, Checkpoint):
            return source
        if isinstance(source, dict):
            return cls._from_state_dict(source, label or "<in-memory state dict>", None)
        if isinstance(source, os.PathLike):
            path = Path(source)
        elif isinstance(source, str):
            if not source:
                raise InputError("empty model path or hub id")
            path = Path(source).expanduser()
            if not os.path.lexists(path):
                if looks_like_hub_id(source):
                    return cls._from_dir(_download(source), label or source, allow_pickle)
                raise InputError(f"{source}: no such file or directory (and not a Hugging "
                                 "Face hub id)")
        else:
            raise InputError(f"cannot open a model from a {type(source).__name__}; give a "
                             "folder, a .safetensors file, a hub id or a state dict")
        label = label or str(source)
        if path.is_dir():
            return cls._from_dir(path, label, allow_pickle)
        if not os.path.lexists(path):
            raise InputError(f"{label}: no such file or directory")
        if not path.exists():
            raise InputError(f"{label}: broken symlink")
        name = path.name.lower()
        if name.endswith(".safetensors"):
            return cls._from_files([path], None, label, None)
        if name.endswith(PICKLE_SUFFIXES):
            return cls._from_pickles([path], None, label, None, allow_pickle)
        raise InputError(f"{label}: not a model folder, .safetensors file or pickle "
                         "checkpoint (.bin/.pt/.pth)")

    @classmethod
    def _from_dir(cls, root: Path, label: str, allow_pickle: bool) -> "Checkpoint":
        root = Path(root)
        if (root / WEIGHTS_NAME).exists():
            return cls._from_files([root / WEIGHTS_NAME], None, label, root)
        if (root / WEIGHTS_INDEX_NAME).exists():
            index = root / WEIGHTS_INDEX_NAME
            shards, weight_map = _read_index(index, root)
            return cls._from_files([root / s for s in shards], (index, weight_map), label,
                                   root)
        if (root / PICKLE_NAME).exists():
            return cls._from_pickles([root / PICKLE_NAME], None, label, root, allow_pickle)
        if (root / PICKLE_INDEX_NAME).exists():
            index = root / PICKLE_INDEX_NAME
            if not allow_pickle:
                raise InputError(f"{index}: {_PICKLE_REFUSED}")
            shards, weight_map = _read_index(index, root)
            return cls._from_pickles([root / s for s in shards], (index, weight_map), label,
                                     root, allow_pickle)
        try:
            present = sorted(p.name for p in root.iterdir())
        except OSError as exc:
            raise InputError(f"{label}: cannot list the model folder: {exc}") from None
        raise InputError(f"{label}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, {PICKLE_NAME} or "
                         f"{PICKLE_INDEX_NAME} in the model folder (it holds "
                         f"{_short(present)})")

    @classmethod
    def _from_files(cls, paths: list[Path], index, label: str, root: Path | None
                    ) -> "Checkpoint":
        files: list[SafetensorsFile] = []
        try:
            for p in paths:
                files.append(SafetensorsFile(p))
                if len(files) > MAX_OPEN_FILES:
                    files[-1 - MAX_OPEN_FILES]._drop_fd()
            infos: dict[str, TensorInfo] = {}
            sources: dict = {}
            for f in files:
                for name, info in f.tensors.items():
                    if name in sources:
                        raise InputError(f"{label}: tensor {name!r} is present in two shards, "
                                         f"{sources[name].path.name!r} and {f.path.name!r}")
                    infos[name], sources[name] = info, f
            if index is not None:
                _check_against_index(index, {n: s.path.name for n, s in sources.items()})
            return cls(label, root, infos, sources, files)
        except BaseException:
            for f in files:
                f.close()
            raise

    @classmethod
    def _from_pickles(cls, paths: list[Path], index, label: str, root: Path | None,
                      allow_pickle: bool) -> "Checkpoint":
        if not allow_pickle:
            raise InputError(f"{paths[0]}: {_PICKLE_REFUSED}")
        state: dict = {}
        owner: dict[str, str] = {}
        for p in paths:
            for name, tensor in _load_pickle(p).items():
                if name in state:
                    raise InputError(f"{label}: tensor {name!r} is present in two shards, "
                                     f"{owner[name]!r} and {p.name!r}")
                state[name], owner[name] = tensor, p.name
        if index is not None:
            _check_against_index(index, owner)
        return cls._from_state_dict(state, label, root)

    @classmethod
    def _from_state_dict(cls, sd: dict, label: str, root: Path | None) -> "Checkpoint":
        infos, sources = {}, {}
        for name, t in sd.items():
            if not isinstance(name, str):
                raise InputError(f"{label}: tensor name {_short(name)} is not a string")
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{label}: {name!r} holds a {type(t).__name__}, not a tensor "
                                 "(expected a flat state dict of tensors)")
            if t.layout != torch.strided or t.device.type == "meta":
                raise InputError(f"{label}: tensor {name!r} is {t.layout} on {t.device}; only "
                                 "dense tensors with data can be merged")
            if t.dtype not in DTYPE_CODES:
                raise InputError(f"{label}: tensor {name!r} has unsupported dtype {t.dtype}")
            infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), 0,
                                     t.numel() * t.element_size())
            sources[name] = t
        return cls(label, root, infos, sources, [])

    # -- tensors --------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(f"{self.label}: no tensor {name!r}") from None

    def read_into(self, name: str, out: torch.Tensor, start: int = 0,
                  count: int | None = None) -> torch.Tensor:
        """Raw bytes of elements [start, start+count) of ``name`` into the contiguous CPU
        tensor ``out`` (same contract as ``SafetensorsFile.read_into``). Returns out."""
        src = self._sources.get(name)
        if src is None:
            self.info(name)  # raises
        if isinstance(src, SafetensorsFile):
            self._touch(src)
            return src.read_into(name, out, start, count)
        info = self._infos[name]
        start, count = check_range(self.label, info, start, count)
        dst = byte_view(out, count * info.itemsize, f"{self.label}: tensor {name!r}")
        if count:
            part = src.detach().reshape(-1)[start:start + count].cpu().contiguous()
            dst.copy_(part.view(torch.uint8))
        return out

    def view(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start+count) of ``name`` as a flat CPU tensor of its stored dtype,
        without a copy where possible: a mapped range of a safetensors file
        (``SafetensorsFile.view``) or a slice of an in-memory tensor. Read it, don't write it."""
        src = self._sources.get(name)
        if src is None:
            self.info(name)  # raises
        if isinstance(src, SafetensorsFile):
            self._touch(src)
            return src.view(name, start, count)
        start, count = check_range(self.label, self._infos[name], start, count)
        return src.detach().cpu().reshape(-1)[start:start + count].contiguous()

    def _touch(self, f: SafetensorsFile) -> None:
        """Mark ``f`` as recently used; close the descriptors of idle older files."""
        with self._lock:
            self._open_lru[id(f)] = f
            self._open_lru.move_to_end(id(f))
            excess = len(self._open_lru) - MAX_OPEN_FILES
            for key in list(self._open_lru)[:max(excess, 0)]:
                if self._open_lru[key]._drop_fd():
                    del self._open_lru[key]

    # -- side files -----------------------------------------------------------------------
    @property
    def config(self) -> dict | None:
        """The parsed config.json of the model folder, or None."""
        if not self._config_loaded:
            self._config = self._read_config()
            self._config_loaded = True
        return self._config

    def _read_config(self) -> dict | None:
        if self.root is None:
            return None
        path = self.root / "config.json"
        if not path.exists():
            return None
        cfg = loads_strict_json(_read_text(path), str(path), "config")
        if not isinstance(cfg, dict):
            raise InputError(f"{path}: config is a JSON {type(cfg).__name__}, not an object")
        return cfg

    def files_to_copy(self) -> list[Path]:
        """Config and tokenizer files of the model folder worth copying next to a merged
        model: regular files (or symlinks to them) directly in ``root`` whose target stays
        inside ``root`` or, for a hub cache snapshot, inside that repository's ``blobs``."""
        if self.root is None:
            return []
        root_real = os.path.realpath(self.root)
        allowed = [root_real]
        if self.root.parent.name == "snapshots":
            allowed.append(os.path.realpath(self.root.parent.parent / "blobs"))
        out = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            raise InputError(f"{self.label}: cannot list the model folder: {exc}") from None
        for entry in entries:
            if not any(fnmatch.fnmatchcase(entry.name, p) for p in COPY_PATTERNS):
                continue
            if not entry.is_file():  # follows symlinks: the target must be a regular file
                continue
            real = os.path.realpath(entry.path)
            if entry.is_symlink() and not any(real.startswith(a + os.sep) for a in allowed):
                continue  # a link out of the model (e.g. to a private file) is never copied
            out.append(self.root / entry.name)
        return out

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        for f in self._files:
            f.close()
        with self._lock:
            self._open_lru.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self._infos)} tensors)"


# -- helpers ----------------------------------------------------------------------------------

def _read_text(path: Path, limit: int = JSON_LIMIT) -> str:
    """A small UTF-8 file (index, config), refusing non-regular or oversized files."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise InputError(f"{path}: {st.st_size} bytes, more than the {limit}-byte limit "
                             "for a JSON file")
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise InputError(f"{path}: more than the {limit}-byte limit for a JSON file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 ({exc.reason})") from None


def _check_shard_name(index: Path, tensor: str, shard) -> None:
    where = f"{index}: tensor {tensor!r} maps to {_short(shard)}"
    if not isinstance(shard, str) or not shard:
        raise InputError(f"{where}: the shard file name must be a non-empty string")
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", shard):
        raise InputError(f"{where}: an absolute path is not allowed; shards must be plain "
                         "file names inside the model folder")
    if ".." in re.split(r"[/\\]", shard) or shard == ".":
        raise InputError(f"{where}: '..' (path traversal) is not allowed; shards must be "
                         "plain file names inside the model folder")
    if "/" in shard or "\\" in shard or os.sep in shard or "\0" in shard:
        raise InputError(f"{where}: a path separator is not allowed; shards must be plain "
                         "file names inside the model folder")


def _read_index(index: Path, root: Path) -> tuple[list[str], dict[str, str]]:
    """(shard file names in order of first appearance, weight_map) of a validated index."""
    doc = loads_strict_json(_read_text(index), str(index), "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: no weight_map object naming the shard of every tensor")
    shards: dict[str, None] = {}
    for tensor, shard in weight_map.items():
        _check_shard_name(index, tensor, shard)
        if shard not in shards:
            if not (root / shard).exists():  # follows symlinks (HF cache blobs)
                raise InputError(f"{index}: shard {shard!r} named in the index (for tensor "
                                 f"{tensor!r}) is missing from {root}")
            shards[shard] = None
    return list(shards), weight_map


def _check_against_index(index, stored: dict[str, str]) -> None:
    """The index's weight_map and the shards' contents (tensor -> shard) must agree."""
    path, weight_map = index
    for tensor, shard in weight_map.items():
        where = stored.get(tensor)
        if where is None:
            raise InputError(f"{path}: tensor {tensor!r} is named in the index but missing "
                             f"from its shard {shard!r}")
        if where != shard:
            raise InputError(f"{path}: tensor {tensor!r} is listed in shard {shard!r} but "
                             f"stored in {where!r}")
    for tensor, shard in stored.items():
        if tensor not in weight_map:
            raise InputError(f"{path.parent / shard}: tensor {tensor!r} is not named in the "
                             f"index {path.name}")


def _load_pickle(path: Path) -> dict:
    """torch.load with weights_only=True (no code runs) and mmap; a flat dict of tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure of an untrusted file is an input error
        import pickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            raise InputError(f"{path}: refused by weights-only loading: the pickle asks for "
                             "objects other than tensors (it could run code), so it is not "
                             f"loaded ({first})") from None
        if "mmap can only be used" in str(exc):
            raise InputError(f"{path}: legacy (pre-zip) torch pickle format, which cannot be "
                             "loaded with mmap; convert it to safetensors") from None
        raise InputError(f"{path}: cannot load the pickle checkpoint: {type(exc).__name__}: "
                         f"{first}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def _hub_kwargs() -> dict:
    """Cache folder and offline mode from the environment as it is now (huggingface_hub
    reads them once, when it is imported)."""
    kw: dict = {}
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache and os.environ.get("HF_HOME"):
        cache = os.path.join(os.environ["HF_HOME"], "hub")
    if cache:
        kw["cache_dir"] = os.path.expanduser(cache)
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if offline.strip().upper() in ("1", "ON", "YES", "TRUE"):
        kw["local_files_only"] = True
    return kw


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, **_hub_kwargs())
    except Exception as exc:  # noqa: BLE001 - network, auth, cache and validation errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{repo_id}: not a local path, and the Hugging Face hub id could not "
                         f"be resolved: {type(exc).__name__}: {msg}") from None
    return Path(folder)

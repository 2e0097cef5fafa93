"""Vocabulary alignment by token (docs/spec.md §13): read each model's tokenizer, build the
output vocabulary, and map every output token to its row in every input.

An input's vocabulary is read from its ``tokenizer.json`` (with the ``tokenizers``
library: ``get_vocab(with_added_tokens=True)``), or, where that is all there is, from its
SentencePiece ``tokenizer.model`` (the pieces of the ModelProto, read here without the
``sentencepiece`` package). A token is its text; its id is its row in the embedding.

The output vocabulary (``tokenizer_source``):
* ``"base"``: the base's tokens, in its id order;
* a model: that model's tokens, in its id order;
* ``"union"``: the base's tokens in base order, then the tokens the models add. Models
  whose vocabulary extends the base's as a prefix (same tokens at the base's ids) come
  first, the one adding most tokens first (ties: in the order given), then the others in
  the order given; each appends its tokens not yet in the output, in its id order. So a
  CT vocabulary that extends the base keeps its ids exactly.

``align`` returns an ``Alignment``: the output tokens and, per input, the input row of
every output token (-1: the input lacks it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, ParameterError

SOURCES = ("base", "union")
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt")
_SP_CONTROL = (2, 3)        # SentencePiece piece types UNKNOWN, CONTROL: special tokens


@dataclass
class Vocab:
    """One input's tokenizer. ``tokens[i]``: the text of id i (None: no token has that
    id); ``index``: text -> id; ``special``: the texts marked special (added tokens with
    ``special: true``, SentencePiece control and unknown pieces); ``roles``: role
    (bos_token...) -> text, from tokenizer_config.json / special_tokens_map.json;
    ``doc``: the parsed tokenizer.json (None for a SentencePiece-only folder)."""

    label: str
    root: Path
    tokens: list
    index: dict
    special: set
    roles: dict
    doc: dict | None = None

    @property
    def size(self) -> int:
        """Ids the tokenizer uses: its largest id + 1."""
        return len(self.tokens)

    def roles_of(self, token: str) -> set:
        return {r for r, t in self.roles.items() if t == token and r != "pad_token"}


def _role_text(value):
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the {what}: {exc}") from None


def _roles(root: Path) -> dict:
    roles = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the latter wins
        path = root / name
        if path.is_file():
            doc = _read_json(path, name)
            if isinstance(doc, dict):
                for r in ROLES:
                    text = _role_text(doc.get(r))
                    if text is not None:
                        roles[r] = text
    return roles


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; value: int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield num, wire, value


def sentencepiece_pieces(path: Path) -> list[tuple[str, int]]:
    """[(piece, type)] of a SentencePiece ``tokenizer.model`` (ModelProto field 1, each
    a SentencePiece with piece = field 1, type = field 3, default NORMAL = 1), by id."""
    try:
        data = path.read_bytes()
        pieces = []
        for num, wire, value in _fields(data):
            if num != 1 or wire != 2:
                continue
            piece, kind = None, 1
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif n == 3 and w == 0:
                    kind = v
            if piece is None:
                raise ValueError(f"piece {len(pieces)} has no text")
            pieces.append((piece, kind))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable SentencePiece model: {exc}") from None
    if not pieces:
        raise InputError(f"{path}: a SentencePiece model without pieces")
    return pieces


def read_vocab(ckpt) -> Vocab | None:
    """The tokenizer of an opened checkpoint's folder, or None when it has none."""
    root = ckpt.root
    if root is None:
        return None
    tj, sp = root / "tokenizer.json", root / "tokenizer.model"
    if tj.is_file():
        from tokenizers import Tokenizer
        doc = _read_json(tj, "tokenizer")
        try:
            mapping = Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
        except Exception as exc:    # tokenizers raises plain Exceptions on bad files
            raise InputError(f"{tj}: the tokenizers library cannot read it: {exc}") from None
        special = {a["content"] for a in doc.get("added_tokens") or ()
                   if isinstance(a, dict) and a.get("special")}
    elif sp.is_file():
        doc = None
        pieces = sentencepiece_pieces(sp)
        mapping, special = {}, set()
        for i, (piece, kind) in enumerate(pieces):
            mapping.setdefault(piece, i)
            if kind in _SP_CONTROL:
                special.add(piece)
        extra = root / "added_tokens.json"      # the slow tokenizers' added tokens
        if extra.is_file():
            added = _read_json(extra, "added tokens")
            if isinstance(added, dict):
                mapping.update({str(k): int(v) for k, v in added.items()})
    else:
        return None
    size = max(mapping.values(), default=-1) + 1
    tokens: list = [None] * size
    for text, i in mapping.items():
        if i < 0:
            raise InputError(f"{ckpt.label}: token {text!r} has a negative id {i}")
        if tokens[i] is not None and tokens[i] != text:
            raise InputError(f"{ckpt.label}: tokens {tokens[i]!r} and {text!r} share id {i}")
        tokens[i] = text
    index = {t: i for i, t in enumerate(tokens) if t is not None}
    return Vocab(ckpt.label, root, tokens, index, special, _roles(root), doc)


@dataclass
class Alignment:
    """The output vocabulary and where each input holds its tokens.

    tokens: output token texts, by output id. rows[j]: int64 [len(tokens)], the row of each
    output token in input j (inputs: the base first when there is one, then the models;
    -1: that input lacks the token). padded: output rows with padding (pad_to_multiple_of).
    source: "base", "union" or the model index. new_from: model index -> how many output
    tokens the base lacks were taken from that model (the first of the models that has the
    token, in the union order). not_kept: input index -> how many of its tokens are not in
    the output (source base or a model). vocabs: the inputs' Vocab, same order as rows."""

    tokens: list
    rows: list
    padded: int
    source: object
    vocabs: list
    has_base: bool
    new_from: dict = field(default_factory=dict)
    not_kept: dict = field(default_factory=dict)
    missing: dict = field(default_factory=dict)   # input -> output tokens it lacks
    files: dict = field(default_factory=dict)     # the output's tokenizer files (tokenizer_files)
    unused_rows: dict = field(default_factory=dict)   # input -> embedding rows without a token

    @property
    def size(self) -> int:
        return len(self.tokens)

    def masks(self) -> np.ndarray:
        """int64 [size]: bit j set when input j has the token."""
        m = np.zeros(self.size, dtype=np.int64)
        for j, r in enumerate(self.rows):
            m |= (r >= 0).astype(np.int64) << j
        return m

    def digest(self) -> str:
        import hashlib
        h = hashlib.sha256(json.dumps([self.tokens, self.padded]).encode())
        for r in self.rows:
            h.update(r.tobytes())
        return h.hexdigest()


def resolve_source(source, models: list) -> object:
    """``tokenizer_source`` as "base", "union" or a model index (an int, or the model as
    given in ``models``)."""
    if isinstance(source, str) and source.lower() in SOURCES:
        return source.lower()
    if isinstance(source, int) and not isinstance(source, bool):
        if 0 <= source < len(models):
            return source
    elif isinstance(source, str):
        hits = [i for i, m in enumerate(models) if isinstance(m, (str, Path)) and
                str(m) == source]
        if len(hits) == 1:
            return hits[0]
    raise ParameterError(f"tokenizer_source must be 'base', 'union', a model index in "
                         f"0..{len(models) - 1} or one of the models as given, got {source!r}")


def _check_roles(vocabs: list, tokens: list) -> None:
    """A token the output keeps must have the same special role in every tokenizer that has
    it: special (added ``special: true`` / control piece) or not, and the same bos / eos /
    unk role where two tokenizers give it one."""
    out = set(tokens)
    for a in range(len(vocabs)):
        for b in range(a + 1, len(vocabs)):
            va, vb = vocabs[a], vocabs[b]
            for t in sorted((va.special ^ vb.special) & out):
                if t in va.index and t in vb.index:
                    sp, plain = (va, vb) if t in va.special else (vb, va)
                    raise InputError(f"token {t!r} is a special token in {sp.label}'s tokenizer "
                                     f"but an ordinary one in {plain.label}'s; fastmerge "
                                     "cannot give it one role in the merged tokenizer")
            for t in sorted(set(va.roles.values()) | set(vb.roles.values())):
                ra, rb = va.roles_of(t), vb.roles_of(t)
                if t in out and ra and rb and ra != rb:
                    raise InputError(f"token {t!r} is the {'/'.join(sorted(ra))} of "
                                     f"{va.label}'s tokenizer but the {'/'.join(sorted(rb))} of "
                                     f"{vb.label}'s")


def align(vocabs: list, rows: list, source, has_base: bool,
          pad_to_multiple_of: int | None = None) -> Alignment:
    """The output vocabulary of ``source`` and the row maps. ``vocabs[j]`` / ``rows[j]``:
    input j's Vocab (None: no tokenizer files) and its embedding's row count (base first
    when ``has_base``; for ``linear`` the first model stands for the base)."""
    for j, (v, r) in enumerate(zip(vocabs, rows)):
        if v is None:
            continue
        beyond = [t for i, t in enumerate(v.tokens) if t is not None and i >= r]
        if beyond:
            raise InputError(f"{v.label}: its tokenizer has {len(beyond)} token(s) with ids "
                             f"at or past the {r} rows of its embedding (first: "
                             f"{beyond[0]!r}, id {v.index[beyond[0]]}); the tokenizer and the "
                             "weights do not belong together")
    missing = [j for j, v in enumerate(vocabs) if v is None]
    if missing:
        j = missing[0]
        raise InputError(f"{_input_name(j, has_base)} has no tokenizer files (tokenizer.json "
                         f"or tokenizer.model), so its embedding rows cannot be matched to "
                         f"tokens for tokenizer_source={source!r}")
    ref = vocabs[0]
    if source == "union":
        order = _union_order(vocabs, has_base)
        tokens = [t for t in ref.tokens]
        if None in tokens:
            raise InputError(f"{ref.label}: its tokenizer has no token for id "
                             f"{tokens.index(None)}; the union keeps the base's ids, which "
                             "needs a token for every id")
        seen = set(tokens)
        new_from = {}
        for j in order:
            added = [t for t in vocabs[j].tokens if t is not None and t not in seen]
            seen.update(added)
            tokens += added
            if added:
                new_from[j - (1 if has_base else 0)] = len(added)
    else:
        src = vocabs[0] if source == "base" else vocabs[source + (1 if has_base else 0)]
        if None in src.tokens:
            raise InputError(f"{src.label}: its tokenizer has no token for id "
                             f"{src.tokens.index(None)}; the output keeps its ids, which needs "
                             "a token for every id")
        tokens = list(src.tokens)
        new_from = {}
        if has_base:
            base = vocabs[0].index
            for j in range(1, len(vocabs)):
                k = sum(1 for t in tokens if t not in base and t in vocabs[j].index
                        and not any(t in vocabs[q].index for q in range(1, j)))
                if k:
                    new_from[j - 1] = k
    _check_roles(vocabs, tokens)
    out_rows, not_kept, lacks = [], {}, {}
    keep = set(tokens)
    for j, v in enumerate(vocabs):
        r = np.fromiter((v.index.get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
        out_rows.append(r)
        dropped = sum(1 for t in v.index if t not in keep)
        if dropped:
            not_kept[j] = dropped
        absent = int((r < 0).sum())
        if absent:
            lacks[j] = absent
    unused = {j: r - sum(1 for t in v.tokens if t is not None)
              for j, (v, r) in enumerate(zip(vocabs, rows))}
    padded = len(tokens)
    if pad_to_multiple_of:
        padded = -(-padded // pad_to_multiple_of) * pad_to_multiple_of
    return Alignment(tokens, out_rows, padded, source, vocabs, has_base, new_from,
                     not_kept, lacks, unused_rows={j: k for j, k in unused.items() if k})


def _input_name(j: int, has_base: bool) -> str:
    return "the base" if has_base and j == 0 else f"model {j - (1 if has_base else 0)}"


def _union_order(vocabs: list, has_base: bool) -> list[int]:
    """Inputs after the first, in the union's order (see the module docstring)."""
    ref = vocabs[0].tokens
    def key(j):
        t = vocabs[j].tokens
        prefix = len(t) >= len(ref) and t[:len(ref)] == ref
        added = sum(1 for x in t if x is not None and x not in vocabs[0].index)
        return (0, -added, j) if prefix else (1, 0, j)
    return sorted(range(1, len(vocabs)), key=key)


# -- output tokenizer files -------------------------------------------------------------------

def _is_prefix_extension(v: Vocab, ref: Vocab) -> bool:
    return len(v.tokens) >= len(ref.tokens) and v.tokens[:len(ref.tokens)] == ref.tokens


def _merge_pair(m) -> tuple:
    if isinstance(m, str):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"unexpected merge {m!r}")
        return tuple(parts)
    if isinstance(m, (list, tuple)) and len(m) == 2:
        return tuple(m)
    raise ValueError(f"unexpected merge {m!r}")


def union_tokenizer_json(al: Alignment) -> dict:
    """tokenizer.json of a union vocabulary no input has as a whole (BPE tokenizers only).

    Template: the first model in the union order whose vocabulary extends the base's as a
    prefix, else the base's tokenizer.json (its normalizer, pre-tokenizer, decoder and
    post-processor are kept). Vocabulary: every output token some input has in its BPE
    vocabulary, at its output id. Merges: the template's, then each other input's (base
    first, then the union order) whose two parts and result are in the vocabulary and that
    are not listed yet. Added tokens: the template's, then the others', each once, at
    their output ids."""
    order = [0] + _union_order(al.vocabs, al.has_base)
    ref = al.vocabs[0]
    prefix = [j for j in order[1:] if _is_prefix_extension(al.vocabs[j], ref)]
    first = prefix[0] if prefix else 0
    sequence = [first] + [j for j in order if j != first]
    for j in sequence:
        v = al.vocabs[j]
        kind = (v.doc or {}).get("model", {}).get("type") if v.doc else None
        if kind != "BPE":
            raise InputError(f"{v.label}: a union vocabulary is built here for BPE tokenizers "
                             f"(tokenizer.json); this one is {kind or 'SentencePiece-only'}. "
                             "Use tokenizer_source 'base' or a model instead")
    template = al.vocabs[first].doc       # copied shallowly: only its model, merges and
    doc = {**template, "model": dict(template["model"])}   # added tokens are replaced
    index = {t: i for i, t in enumerate(al.tokens)}
    bpe = set()
    for j in sequence:
        bpe.update(al.vocabs[j].doc["model"]["vocab"])
    vocab = {t: index[t] for t in al.tokens if t in bpe}
    merges, seen = [], set()
    as_text = any(isinstance(m, str) for m in doc["model"].get("merges") or ())
    for j in sequence:
        v = al.vocabs[j]
        for m in v.doc["model"].get("merges") or ():
            try:
                a, b = _merge_pair(m)
            except ValueError as exc:
                raise InputError(f"{v.label}: tokenizer.json: {exc}") from None
            if (a, b) in seen or a not in vocab or b not in vocab or a + b not in vocab:
                continue
            seen.add((a, b))
            merges.append(f"{a} {b}" if as_text else [a, b])
    added, have = [], set()
    for j in sequence:
        for entry in al.vocabs[j].doc.get("added_tokens") or ():
            content = entry.get("content") if isinstance(entry, dict) else None
            if content in have or content not in index:
                continue
            have.add(content)
            added.append({**entry, "id": index[content]})
    unplaced = [t for t in al.tokens if t not in vocab and t not in have]
    if unplaced:
        raise InputError(f"token {unplaced[0]!r} (and {len(unplaced) - 1} more) is neither in a "
                         "BPE vocabulary nor an added token of the inputs' tokenizer.json")
    doc["model"]["vocab"] = vocab
    doc["model"]["merges"] = merges
    doc["added_tokens"] = sorted(added, key=lambda e: e["id"])
    return doc


def _source_input(al: Alignment) -> int | None:
    """The input whose own tokenizer files describe the output vocabulary, if any."""
    if al.source == "base":
        return 0
    if isinstance(al.source, int):
        return al.source + (1 if al.has_base else 0)
    for j, v in enumerate(al.vocabs):          # union: an input with exactly these tokens
        if v.tokens == al.tokens:
            return j
    return None


def tokenizer_files(al: Alignment, config_root: Path | None) -> dict:
    """The output's tokenizer files, {name: source Path to copy, or text to write}, made
    and checked before the merge starts (``write_tokenizer`` writes them).

    tokenizer.json / tokenizer.model / added_tokens.json...: the input whose vocabulary
    the output is (source base or a model; for union an input with exactly the union's
    tokens), copied; else the union's tokenizer.json (``union_tokenizer_json``).
    tokenizer_config.json and special_tokens_map.json: those of ``config_root`` (the model
    whose config and chat template are copied) when it has them, else the vocabulary
    source's; ``added_tokens_decoder`` is rewritten to the output ids. Every special-token
    role they name must be an output token."""
    j = _source_input(al)
    files = {}
    if j is not None:
        src = al.vocabs[j].root
        for name in TOKENIZER_FILES:
            if name in ("tokenizer_config.json", "special_tokens_map.json"):
                continue
            if (src / name).is_file():
                files[name] = src / name
        doc = al.vocabs[j].doc
    else:
        doc = union_tokenizer_json(al)
        # no indent: the json module's C encoder (indent makes it Python's, ~15× slower)
        files["tokenizer.json"] = json.dumps(doc, ensure_ascii=False) + "\n"
    fallback = al.vocabs[j if j is not None else 0].root
    index = {t: i for i, t in enumerate(al.tokens)}
    out_added = {e["content"]: e for e in (doc or {}).get("added_tokens") or ()
                 if isinstance(e, dict) and "content" in e}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = config_root / name if config_root is not None else None
        if path is None or not path.is_file():
            path = fallback / name
        if not path.is_file():
            continue
        cfg = _read_json(path, name)
        if not isinstance(cfg, dict):
            raise InputError(f"{path}: not a JSON object")
        for role in ROLES:
            text = _role_text(cfg.get(role))
            if text is not None and text not in index:
                raise InputError(f"{path}: its {role} {text!r} is not in the output vocabulary "
                                 f"(tokenizer_source={al.source!r}); choose a config_from "
                                 "model whose special tokens the output has, or "
                                 "tokenizer_source 'union'")
        if "added_tokens_decoder" in cfg:
            dec = {}
            for entry in (cfg["added_tokens_decoder"] or {}).values():
                if isinstance(entry, dict) and entry.get("content") in index:
                    dec[index[entry["content"]]] = entry
            for content, entry in out_added.items():
                dec.setdefault(index[content], {k: v for k, v in entry.items() if k != "id"})
            cfg["added_tokens_decoder"] = {str(k): dec[k] for k in sorted(dec)}
        files[name] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    return files


def write_tokenizer(files: dict, out: Path) -> None:
    """Write ``tokenizer_files``' result into the folder ``out``."""
    import shutil
    for name, what in files.items():
        if isinstance(what, Path):
            shutil.copyfile(what, out / name)
        else:
            (out / name).write_text(what, encoding="utf-8")

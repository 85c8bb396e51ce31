"""The precision file: one safetensors file whose ``__metadata__`` holds a JSON header.

Loading never executes code (safetensors + JSON only, no pickle). The header carries a
format version, the parameter table, the block list, the user metadata and a SHA-256
checksum over every tensor, so truncation and corruption are detected. Saving writes a
temporary file next to the target and renames it (``lalora.atomic_file``), so an interrupted
save leaves any previous file intact. Specification: docs/file-format.md.

This module knows the file's layout, not the ``Precision`` class: ``save_precision`` reads a
precision's ``anchor``, ``blocks``, ``prior_precision`` and ``metadata``; ``read_precision``
returns them (``PrecisionParts``), checked against the file's own header (names, shapes, dtypes,
checksums). ``Precision.save``/``Precision.load`` build on it (``lalora.precision`` imports this
module, never the other way), and ``Precision.load`` validates the blocks (finite, shapes, PSD
factors) once, as the ``Precision`` is built.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from .atomic_file import atomic_save_file
from .blocks import Block, block_class
from .blocks.equality import tensor_fingerprint
from .errors import PrecisionFileError
from .options import curvature_name
from .version import __version__

FORMAT_NAME = "lalora.precision"
#: 2: adds ``header_checksum``; 3: the anchor is stored once (Kronecker blocks no longer hold ``A0``/``B0``)
#: and low-rank factors are a representation of ``kfac``/``tri-kfac`` blocks, not block kinds of their own.
#: Files of versions 1 and 2 are still read (``_upgrade_block``).
FORMAT_VERSION = 3
_HEADER_KEY = "lalora"
_MAX_HEADER_BYTES = 100 * 2**20


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _header_checksum(header: dict) -> str:
    """SHA-256 over the canonical JSON of the header without its ``header_checksum`` field,
    so a changed shape, parameter name, prior or metadata value is detected like a changed tensor."""
    body = {k: v for k, v in header.items() if k != "header_checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _store(tensors: dict, seen: dict, key: str, t: torch.Tensor) -> str:
    """Put block tensor ``t`` into ``tensors`` under ``key``, or return the key of an equal tensor stored
    already (a shared factor: the input factor ``X`` of the q/k/v adapters of one layer input, or of gate/up,
    is stored once; several blocks then name one key). Equal means ``torch.equal``: bit for bit, no loss."""
    t = t.detach().cpu().contiguous()
    fp = tensor_fingerprint(t) if t.numel() else None
    for other in seen.get(fp, []):
        if torch.equal(tensors[other], t):
            return other
    tensors[key] = t
    if fp is not None:
        seen.setdefault(fp, []).append(key)
    return key


def save_precision(precision, path) -> None:
    """Write ``precision`` (its ``anchor``, ``blocks``, ``prior_precision``, ``metadata``) to ``path``, atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    params = []
    for i, (name, t) in enumerate(precision.anchor.items()):
        key = f"anchor.{i}"
        tensors[key] = t.detach().float().cpu().contiguous()
        params.append({"name": name, "shape": list(t.shape), "anchor": key})
    blocks, seen = [], {}
    for i, b in enumerate(precision.blocks):
        keys = {role: _store(tensors, seen, f"block.{i}.{role}", t) for role, t in b.tensors().items()}
        blocks.append({"kind": b.kind, "params": list(b.params), "config": _jsonable(b.config()), "tensors": keys})
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lalora_version": __version__,
        "params": params,
        "blocks": blocks,
        "prior_precision": precision.prior_precision,
        "metadata": _jsonable(precision.metadata),
        "checksum": _checksum(tensors),
    }
    header["header_checksum"] = _header_checksum(header)
    atomic_save_file(tensors, path, {_HEADER_KEY: json.dumps(header)})


def _field(obj, key, typ, where):
    if not isinstance(obj, dict) or key not in obj:
        raise PrecisionFileError(f"{where}: missing field {key!r}")
    val = obj[key]
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise PrecisionFileError(f"{where}: field {key!r} has type {type(val).__name__}, expected {getattr(typ, '__name__', typ)}")
    return val


def read_header(path) -> dict:
    """The JSON header of a precision file, after basic checks (no tensors read)."""
    path = Path(path)
    if not path.is_file():
        raise PrecisionFileError(f"precision file {str(path)!r} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise PrecisionFileError(f"{path}: not a lalora precision file (too short: {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise PrecisionFileError(f"{path}: not a lalora precision file or truncated (header length {n}, file size {size})")
        try:
            st_header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise PrecisionFileError(f"{path}: corrupted safetensors header ({type(e).__name__})") from None
    meta = st_header.get("__metadata__") if isinstance(st_header, dict) else None
    if not isinstance(meta, dict) or _HEADER_KEY not in meta:
        raise PrecisionFileError(f"{path}: a safetensors file but not a lalora precision (no '{_HEADER_KEY}' header)")
    try:
        header = json.loads(meta[_HEADER_KEY])
    except (TypeError, json.JSONDecodeError, RecursionError) as e:
        raise PrecisionFileError(f"{path}: corrupted lalora header ({type(e).__name__})") from None
    if _field(header, "format", str, str(path)) != FORMAT_NAME:
        raise PrecisionFileError(f"{path}: field 'format' is {header['format']!r}, expected {FORMAT_NAME!r}")
    version = _field(header, "format_version", int, str(path))
    if version > FORMAT_VERSION:
        raise PrecisionFileError(f"{path}: format_version {version} is newer than this lalora reads ({FORMAT_VERSION}); "
                                 "upgrade lalora")
    if version < 1:
        raise PrecisionFileError(f"{path}: invalid format_version {version}")
    if "header_checksum" in header or version >= 2:
        want = _field(header, "header_checksum", str, str(path))
        if _header_checksum(header) != want:
            raise PrecisionFileError(f"{path}: header checksum mismatch, the lalora header was modified or corrupted")
    return header


_LEGACY_KINDS = {"kfac-lowrank": "kfac", "tri-kfac-lowrank": "tri-kfac"}


def _upgrade_block(kind: str, names: list, state: dict, anchor: dict, where: str) -> str:
    """A Kronecker block of a version 1-2 file as version 3 reads it: ``kfac-lowrank``/``tri-kfac-lowrank``
    become ``kfac``/``tri-kfac`` (low-rank factors are a representation), and the block's own copy of
    the anchor (``A0``, ``B0``) is dropped: the forms use the precision's anchor. A copy that differs
    from the anchor (a version-2 precision moved with ``with_anchor``, whose linearized forms used the
    old point) is reported, since version 3 evaluates every form around the stored anchor."""
    kind = _LEGACY_KINDS.get(kind, kind)
    if kind not in ("kfac", "tri-kfac"):
        return kind
    for role, name in zip(("A0", "B0"), names):
        old = state.pop(role, None)
        if old is not None and name in anchor and (old.shape != anchor[name].shape or not torch.equal(old, anchor[name])):
            import warnings

            warnings.warn(f"{where}: this format-2 {kind} block was fitted at another point than the file's anchor "
                          f"(parameter {name!r}, e.g. after with_anchor); lalora now evaluates every form around the "
                          "anchor (docs/file-format.md#version-3)", UserWarning, stacklevel=4)
            break
    return kind


class PrecisionParts(NamedTuple):
    """What a precision file holds, read and checked against its header; ``Precision(*parts)`` rebuilds it."""

    blocks: list[Block]
    anchor: dict[str, torch.Tensor]
    metadata: dict
    prior_precision: float


def read_precision(path) -> PrecisionParts:
    """Read a precision file; any defect of the file raises ``PrecisionFileError``. The blocks are not
    validated against the anchor here: ``Precision.load`` does that once, as it builds the precision."""
    try:
        return _read_precision(path)
    except PrecisionFileError:
        raise
    except Exception as e:  # defence in depth: a malformed file never escapes as another error type
        raise PrecisionFileError(f"{path}: invalid precision file ({type(e).__name__}: {e})") from None


def _read_tensors(path: Path, header: dict) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupted data
        raise PrecisionFileError(f"{path}: cannot read tensors, file truncated or corrupted ({e})") from None
    if _checksum(tensors) != _field(header, "checksum", str, str(path)):
        raise PrecisionFileError(f"{path}: checksum mismatch, the file is corrupted")
    return tensors


def _tensor(tensors: dict, key, where: str) -> torch.Tensor:
    """The float tensor stored under ``key`` (NaN/Inf are found by the block validation, in one pass)."""
    if not isinstance(key, str) or key not in tensors:
        raise PrecisionFileError(f"{where}: tensor {key!r} is missing from the file")
    t = tensors[key]
    if t.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise PrecisionFileError(f"{where}: tensor {key!r} has dtype {t.dtype}, expected a float type")
    return t


def _read_anchor(header: dict, tensors: dict, where: str) -> dict[str, torch.Tensor]:
    anchor = {}
    for i, p in enumerate(_field(header, "params", list, where)):
        pw = f"{where}: params[{i}]"
        name = _field(p, "name", str, pw)
        shape = _field(p, "shape", list, pw)
        t = _tensor(tensors, _field(p, "anchor", str, pw), pw)
        if list(t.shape) != shape:
            raise PrecisionFileError(f"{pw} ({name!r}): anchor shape {list(t.shape)} != declared {shape}")
        if name in anchor:
            raise PrecisionFileError(f"{pw}: duplicate parameter {name!r}")
        anchor[name] = t
    return anchor


def _read_block(b, i: int, tensors: dict, anchor: dict, version: int, where: str) -> Block:
    bw = f"{where}: blocks[{i}]"
    kind = _field(b, "kind", str, bw)
    names = _field(b, "params", list, bw)
    for n in names:
        if not isinstance(n, str):
            raise PrecisionFileError(f"{bw}: parameter names must be strings, got {type(n).__name__}")
        if n not in anchor:
            raise PrecisionFileError(f"{bw}: unknown parameter {n!r}")
    keys = _field(b, "tensors", dict, bw)
    config = _field(b, "config", dict, bw)
    state = {r: _tensor(tensors, k, f"{bw}.{r}") for r, k in keys.items()}
    if version < 3:
        kind = _upgrade_block(kind, names, state, anchor, bw)
    try:
        cls = block_class(kind)
    except KeyError as e:
        raise PrecisionFileError(f"{bw}: {e.args[0]}") from None
    try:
        return cls.from_state(tuple(names), state, config)
    except PrecisionFileError:
        raise
    except Exception as e:
        raise PrecisionFileError(f"{bw} ({kind}): invalid block ({type(e).__name__}: {e})") from None


def _read_precision(path) -> PrecisionParts:
    path = Path(path)
    header = read_header(path)
    where = str(path)
    tensors = _read_tensors(path, header)
    anchor = _read_anchor(header, tensors, where)
    blocks = [_read_block(b, i, tensors, anchor, header["format_version"], where)
              for i, b in enumerate(_field(header, "blocks", list, where))]
    prior = header.get("prior_precision", 0.0)
    if not isinstance(prior, (int, float)) or isinstance(prior, bool) or not (prior >= 0) or prior == float("inf"):
        raise PrecisionFileError(f"{where}: field 'prior_precision' must be a finite number >= 0, got {prior!r}")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise PrecisionFileError(f"{where}: field 'metadata' must be an object")
    if isinstance(metadata.get("curvature"), str):  # lalora 0.1 wrote empirical_fisher / mc_fisher
        metadata = {**metadata, "curvature": curvature_name(metadata["curvature"])}
    return PrecisionParts(blocks, anchor, metadata, float(prior))

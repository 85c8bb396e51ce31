"""Sharded precisions: an index JSON plus one precision file per rank (the Hugging Face checkpoint layout,
``model.safetensors.index.json`` + ``model-00001-of-00002.safetensors``). Specification: docs/scale.md.

A fit with ``shard_factors=True`` under ``torch.distributed`` leaves on each rank the blocks whose factors it
owns (``metadata["factor_shard"]``: ``rank``, ``world_size``, ``owners`` = parameter name -> owning rank).
``Precision.save(path)`` then writes, on *every* rank, that rank's blocks as an ordinary precision file
``<stem>-<rank+1>-of-<world>.safetensors`` (none for a rank that owns nothing), and on rank 0 the index
``<path>.index.json``::

    {"format": "lalora.precision.index", "format_version": 1, "world_size": 2,
     "params": [every LoRA weight, in the order of a single-process fit],
     "weight_map": {parameter name: shard file name}, "prior_precision": 0.0, "metadata": {...}}

Every file is written atomically (``lalora.atomic_file``). ``Precision.load(path)`` (the ``.safetensors``
name given to ``save`` or the index itself) reads the index and its shards and returns the whole precision,
equal to a single-process fit; each shard keeps its own checksums, and the index is checked against them
(every parameter in exactly the shard it names). With ``params=`` only the shards holding those
parameters are read.
"""
from __future__ import annotations

import json
from pathlib import Path

from .atomic_file import atomic_write_text
from .errors import PrecisionFileError
from .fileformat import PrecisionParts, read_precision, save_precision
from .version import __version__

INDEX_FORMAT = "lalora.precision.index"
INDEX_VERSION = 1
_SUFFIX = ".index.json"


def shard_of(precision) -> dict | None:
    """The ``factor_shard`` metadata of a precision that is one rank's shard (world size > 1), else None."""
    info = precision.metadata.get("factor_shard")
    return info if isinstance(info, dict) and int(info.get("world_size", 1)) > 1 else None


def index_path(path) -> Path:
    """The index file of a sharded precision saved to ``path`` (``path`` itself if it is an index)."""
    path = Path(path)
    return path if path.name.endswith(_SUFFIX) else path.with_name(path.name + _SUFFIX)


def is_sharded(path) -> bool:
    """Whether ``path`` names a sharded precision: an index file, or a name whose index exists and which is
    not itself a file (both existing is ambiguous: refused)."""
    path = Path(path)
    if path.name.endswith(_SUFFIX):
        return True
    if index_path(path).is_file() and path.exists():
        raise PrecisionFileError(f"{path}: both this file and the sharded precision index {index_path(path).name} "
                                 "exist; pass the index to read the sharded precision, or remove the stale one")
    return index_path(path).is_file()


def shard_name(path, rank: int, world: int) -> str:
    name = index_path(path).name[:-len(_SUFFIX)]
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    return f"{stem}-{rank + 1:05d}-of-{world:05d}.safetensors"


class _Parts:
    """What ``save_precision`` reads from a precision."""

    def __init__(self, precision, metadata):
        self.anchor, self.blocks = precision.anchor, precision.blocks
        self.prior_precision, self.metadata = precision.prior_precision, metadata


def save_sharded(precision, path) -> None:
    """Write this rank's shard and (rank 0) the index; call on every rank (see the module docstring)."""
    info = shard_of(precision)
    rank, world, owners = int(info["rank"]), int(info["world_size"]), dict(info["owners"])
    folder = index_path(path).parent
    mine = [n for n in precision.anchor if owners.get(n) == rank]
    if mine:
        save_precision(_Parts(precision, precision.metadata), folder / shard_name(path, rank, world))
    if rank != 0:
        return
    metadata = {k: v for k, v in precision.metadata.items() if k != "factor_shard"}
    metadata["factor_shards"] = world  # how many ranks the factors were sharded over
    index = {"format": INDEX_FORMAT, "format_version": INDEX_VERSION, "lalora_version": __version__,
             "world_size": world, "params": list(owners),
             "weight_map": {n: shard_name(path, r, world) for n, r in owners.items()},
             "prior_precision": precision.prior_precision, "metadata": json.loads(json.dumps(metadata, default=str))}
    atomic_write_text(index_path(path), json.dumps(index, indent=1))


def read_index(path) -> dict:
    path = index_path(path)
    if not path.is_file():
        raise PrecisionFileError(f"sharded precision index {str(path)!r} does not exist")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrecisionFileError(f"{path}: not a JSON index ({type(e).__name__})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise PrecisionFileError(f"{path}: not a lalora sharded precision index (field 'format' is not {INDEX_FORMAT!r})")
    if not isinstance(index.get("format_version"), int) or index["format_version"] > INDEX_VERSION:
        raise PrecisionFileError(f"{path}: index format_version {index.get('format_version')!r} is not supported "
                                 f"(this lalora reads up to {INDEX_VERSION}): upgrade lalora")
    params, weight_map = index.get("params"), index.get("weight_map")
    if not isinstance(params, list) or not isinstance(weight_map, dict) or set(params) != set(weight_map):
        raise PrecisionFileError(f"{path}: fields 'params' and 'weight_map' must name the same parameters")
    for name in set(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name:
            raise PrecisionFileError(f"{path}: weight_map names {name!r}, not a file beside the index")
    return index


def read_sharded(path, params=None) -> PrecisionParts:
    """The whole precision of a sharded save (``params``: only the shards holding these parameters)."""
    where = index_path(path)
    index = read_index(where)
    weight_map = index["weight_map"]
    wanted = list(index["params"]) if params is None else [n for n in index["params"] if n in set(params)]
    files = list(dict.fromkeys(weight_map[n] for n in wanted))
    anchor, blocks = {}, []
    for name in files:
        shard = where.parent / name
        if not shard.is_file():
            raise PrecisionFileError(f"{where}: shard {name!r} is missing (every rank must call Precision.save)")
        part = read_precision(shard)
        expected = {n for n, f in weight_map.items() if f == name}
        if set(part.anchor) != expected:
            raise PrecisionFileError(f"{shard}: holds parameters {sorted(set(part.anchor) ^ expected)[:4]} "
                                     f"differently from the index {where.name}")
        anchor.update(part.anchor)
        blocks.extend(part.blocks)
    order = {n: i for i, n in enumerate(index["params"])}
    anchor = {n: anchor[n] for n in sorted(anchor, key=order.__getitem__)}
    blocks.sort(key=lambda b: order[b.params[0]])
    metadata = index.get("metadata", {})
    prior = index.get("prior_precision", 0.0)
    if not isinstance(metadata, dict) or not isinstance(prior, (int, float)) or isinstance(prior, bool) or prior < 0:
        raise PrecisionFileError(f"{where}: fields 'metadata' (an object) or 'prior_precision' (a number >= 0) are invalid")
    return PrecisionParts(blocks, anchor, metadata, float(prior))

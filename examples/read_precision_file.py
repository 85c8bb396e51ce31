"""Read a lalora precision file with nothing but the standard library and numpy.

    python examples/read_precision_file.py source.lalora [--quick]

An independent reader of the format in docs/file-format.md (no lalora, no torch, no
safetensors import): it parses the safetensors layout by hand, verifies both checksums, and
evaluates the penalty's quadratic form ``d^T F d`` for a random displacement ``d`` with every
built-in block kind. ``--quick`` (no path): writes a small file with lalora first and checks the
reader against ``Precision.quadratic`` (used by the test suite).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys

import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}  # BF16: convert with a library that has it
TORCH_NAMES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16"}


def read(path):
    """``(header, tensors)``: the lalora JSON header and a dict key -> float64 numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 little-endian header length
    st_header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header = json.loads(st_header["__metadata__"]["lalora"])
    if header["format"] != "lalora.precision" or header["format_version"] > 3:
        raise ValueError(f"{path}: not a lalora precision file this reader understands")
    body = {k: v for k, v in header.items() if k != "header_checksum"}
    if "header_checksum" in header:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        if digest != header["header_checksum"]:
            raise ValueError(f"{path}: header checksum mismatch")
    tensors, h = {}, hashlib.sha256()
    for key in sorted(k for k in st_header if k != "__metadata__"):
        info = st_header[key]
        start, end = info["data_offsets"]
        buf = data[start:end]
        arr = np.frombuffer(buf, dtype=np.dtype(DTYPES[info["dtype"]]).newbyteorder("<")).reshape(info["shape"])
        # tensor checksum: key, torch dtype name, shape as a Python tuple, raw bytes; keys sorted
        h.update(key.encode() + TORCH_NAMES[info["dtype"]].encode() + str(tuple(info["shape"])).encode() + buf)
        tensors[key] = arr.astype(np.float64)
    if h.hexdigest() != header["checksum"]:
        raise ValueError(f"{path}: tensor checksum mismatch")
    return header, tensors


def factor(t, name):
    """A Kronecker factor: dense ``name``, or ``U diag(s) U^T + diag(d)`` from ``name_U/_s/_d`` (low-rank).
    Densified here for brevity; a reader for wide layers would keep the low-rank form."""
    if name in t:
        return t[name]
    U, s, d = t[f"{name}_U"], t[f"{name}_s"], t[f"{name}_d"]
    return U @ np.diag(s) @ U.T + np.diag(d)


def quadratic(header, tensors, delta):
    """``d^T F d`` (without the prior term) for ``delta``: parameter name -> array shaped like it."""
    anchor = {p["name"]: tensors[p["anchor"]] for p in header["params"]}
    total = 0.0
    for block in header["blocks"]:
        t = {role: tensors[key] for role, key in block["tensors"].items()}
        names, kind, cfg = block["params"], block["kind"], block["config"]
        if kind == "diag":  # F = diag(values), values shaped like the parameter
            total += float((t["values"] * delta[names[0]] ** 2).sum())
        elif kind in ("dense", "factored"):  # over the concatenated row-major flattening of params
            v = np.concatenate([delta[p].reshape(-1) for p in names])
            total += float(v @ t["matrix"] @ v) if kind == "dense" else float(((t["factor"] @ v) ** 2).sum())
        elif kind in ("kfac", "tri-kfac", "kfac-lowrank", "tri-kfac-lowrank"):
            # params = (lora_A, lora_B); factors X, G (dense, or low rank + diagonal); the anchor A0, B0
            # (format 3: the file's parameter table; formats 1-2 also stored a copy in the block)
            X, G, s = factor(t, "X"), factor(t, "G"), cfg["scaling"]
            A0, B0 = t.get("A0", anchor[names[0]]), t.get("B0", anchor[names[1]])
            kind = kind.removesuffix("-lowrank")
            dA, dB = delta[names[0]], delta[names[1]]
            if kind == "kfac":  # tr(dA^T G_A dA X) + tr(dB^T G_B dB X_B)
                GA, XB = s**2 * B0.T @ G @ B0, A0 @ X @ A0.T
                total += float(np.trace(dA.T @ GA @ dA @ X) + s**2 * np.trace(dB.T @ G @ dB @ XB))
            else:  # s^2 tr(D^T G D X), D = B0 dA + dB A0
                D = B0 @ dA + dB @ A0
                total += float(s**2 * np.trace(D.T @ G @ D @ X))
        else:
            raise ValueError(f"block kind {kind!r} is not known to this reader")
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", help="a .lalora precision file")
    ap.add_argument("--quick", action="store_true", help="write a test file with lalora and check this reader on it")
    a = ap.parse_args(argv)
    if a.path is None and not a.quick:
        ap.error("give a precision file, or --quick")
    if a.quick:
        return _self_check()
    header, tensors = read(a.path)
    rng = np.random.default_rng(0)
    delta = {p["name"]: rng.standard_normal(p["shape"]) for p in header["params"]}
    print(f"{len(header['params'])} LoRA matrices, blocks: {sorted({b['kind'] for b in header['blocks']})}, "
          f"backend {header['metadata'].get('backend')}, prior_precision {header['prior_precision']}")
    print(f"d^T F d for a standard normal d: {quadratic(header, tensors, delta):.6g}")
    return header, tensors


def _self_check():
    """Write one file per built-in block kind with lalora and compare this reader with lalora's quadratic."""
    import tempfile
    from pathlib import Path

    import torch

    import lalora
    from lalora.blocks.factored import FactoredBlock
    from lalora.blocks.kronecker import KFACBlock, TriKFACBlock

    g = torch.Generator().manual_seed(0)
    r, d_in, d_out, s = 2, 5, 4, 1.5
    anchor = {"m.lora_A": torch.randn(r, d_in, generator=g), "m.lora_B": torch.randn(d_out, r, generator=g)}
    shapes = {n: tuple(t.shape) for n, t in anchor.items()}
    n = r * d_in + d_out * r
    X, G = (lambda m: m @ m.T)(torch.randn(d_in, d_in, generator=g)), (lambda m: m @ m.T)(torch.randn(d_out, d_out, generator=g))
    dense = (lambda m: m @ m.T)(torch.randn(n, n, generator=g))
    blocks = [lalora.DiagBlock("m.lora_A", torch.rand(r, d_in, generator=g)),
              lalora.DenseBlock(("m.lora_A", "m.lora_B"), dense, shapes),
              FactoredBlock(("m.lora_A", "m.lora_B"), torch.randn(3, n, generator=g), shapes),
              KFACBlock(("m.lora_A", "m.lora_B"), X, G, s),
              TriKFACBlock(("m.lora_A", "m.lora_B"), X, G, s)]
    from lalora.compression import compress

    # low-rank factors: max_rank 2 < d_in, d_out, so both factors are stored as U, s, d
    blocks += [compress(lalora.Precision([b], anchor), max_rank=2).blocks[0] for b in blocks[3:5]]
    delta = {k: torch.randn(v.shape, generator=g) for k, v in anchor.items()}
    labels = ["diag", "dense", "factored", "kfac", "tri-kfac", "kfac (low-rank)", "tri-kfac (low-rank)"]
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, b in zip(labels, blocks):
            p = lalora.Precision([b], anchor, prior_precision=0.1)
            path = Path(tmp) / f"{label}.lalora"
            p.save(path)
            header, tensors = read(path)
            ours = quadratic(header, tensors, {k: v.double().numpy() for k, v in delta.items()})
            want = float(p.quadratic({k: v.double() for k, v in delta.items()}))
            errors[label] = abs(ours - want) / abs(want)
            print(f"{label:>19}: reader {ours:.8g}  lalora {want:.8g}  rel. diff {errors[label]:.1e}")
    return errors


if __name__ == "__main__":
    main()
    sys.exit(0)

"""Files of format version 2 (written by lalora 0.1.0 before format 3, tests/fixtures/format2) still load.

Each fixture comes with the old code's own values (``to_dense()`` on 4 probe vectors and its diagonal,
``quadratic(delta)``, the effective-weight form at ``anchor + delta``). The new reader must give the same
numbers: float32 tensors evaluated by other code (old: per-kind formulas, new: one Kronecker algebra), so
they agree to float32 round-off (1e-5 relative), not bitwise. The one file whose Kronecker blocks were
fitted at another point than its anchor (``with_anchor`` in format 2) is read with format 3's meaning,
every form around the stored anchor, with a warning; it is checked against an independent dense
reference (explicit Jacobian at the anchor).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.autograd.functional import jacobian

import lalora
from lalora.blocks.kronecker import KroneckerBlock
from lalora.fileformat import FORMAT_VERSION, read_header
from numerics import rel_diff

FIXTURES = Path(__file__).parent / "fixtures" / "format2"
SAME_MEANING = ["diag", "block", "kfac", "tri-kfac", "kfac-lowrank", "tri-kfac-lowrank", "diag-plus-kfac"]
TOL = 1e-5


def _load(name: str) -> tuple[lalora.Precision, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file with the old meaning loads without a warning
        P = lalora.Precision.load(FIXTURES / f"{name}.lalora")
    return P, load_file(str(FIXTURES / f"{name}.expected.safetensors"))


@pytest.mark.parametrize("name", SAME_MEANING)
def test_format2_file_gives_the_old_numbers(name, tmp_path):
    assert read_header(FIXTURES / f"{name}.lalora")["format_version"] == 2
    P, want = _load(name)
    delta = {n: want[f"delta.{i}"] for i, n in enumerate(P.param_names)}
    dense = P.to_dense()
    assert rel_diff(dense @ want["probes"], want["dense_probes"]) <= TOL
    assert rel_diff(torch.diagonal(dense), want["dense_diagonal"]) <= TOL
    assert rel_diff(P.quadratic(delta), want["quadratic"][0]) <= TOL
    if "effective" in want:
        theta = {n: P.anchor[n] + delta[n] for n in P.param_names}
        assert rel_diff(sum(b.effective_quadratic(theta) for b in P.blocks), want["effective"][0]) <= TOL
    # written again, it is a format-3 file without the duplicate anchor, and reads back as a copy
    P.save(tmp_path / "v3.lalora")
    header = read_header(tmp_path / "v3.lalora")
    assert header["format_version"] == FORMAT_VERSION == 3
    assert not any(role in ("A0", "B0") for b in header["blocks"] for role in b["tensors"])
    assert {b["kind"] for b in header["blocks"]} <= {"diag", "dense", "kfac", "tri-kfac"}
    Q = lalora.Precision.load(tmp_path / "v3.lalora")
    for b, c in zip(P.blocks, Q.blocks):
        assert b.kind == c.kind and all(torch.equal(b.tensors()[k], c.tensors()[k]) for k in b.tensors())


def _explicit_reference(block: KroneckerBlock, A0: torch.Tensor, B0: torch.Tensor) -> torch.Tensor:
    """``J^T kron(G, X) J`` with ``J`` of ``(dA, dB) -> vec(s (B0 dA + dB A0))`` by autograd, float64."""
    s = block.scaling
    A0, B0 = A0.double(), B0.double()

    def delta_w(flat):
        dA, dB = flat[:A0.numel()].view(A0.shape), flat[A0.numel():].view(B0.shape)
        return (s * (B0 @ dA + dB @ A0)).reshape(-1)

    J = jacobian(delta_w, torch.zeros(A0.numel() + B0.numel(), dtype=torch.float64))
    return J.T @ torch.kron(block.G.dense().double(), block.X.dense().double()) @ J


def test_format2_file_with_a_moved_anchor_is_read_around_its_anchor():
    with pytest.warns(UserWarning, match="evaluates every form around the anchor"):
        P = lalora.Precision.load(FIXTURES / "tri-kfac-moved.lalora")
    for block in P.blocks:
        a, b = block.params
        ref = _explicit_reference(block, P.anchor[a], P.anchor[b])
        assert rel_diff(block.to_dense(), ref) <= TOL
        zero = {a: torch.zeros_like(P.anchor[a]), b: torch.zeros_like(P.anchor[b])}
        assert float(block.quadratic(zero)) == 0.0  # exact: the displacement is 0
        assert float(block.effective_quadratic(P.anchor)) == 0.0  # exact: Delta = s (B0 dA + dB A) with dA = dB = 0

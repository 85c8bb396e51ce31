"""Shared input factors are stored once (lalora.fileformat): q/k/v of one layer read the same input, so their
kfac / tri-kfac factor ``X`` is the same tensor bit for bit, and so is gate/up's; the file stores it once
(several blocks name one tensor key) and a loaded precision holds it once in memory.

References: the block tensor bytes expected from the shapes alone (per layer, q/k/v and gate/up of width
``h``: three copies of an ``h x h`` float32 factor fewer); the precision before saving (unshared copies) for
the values; the format-3 fixtures written before sharing (tests/fixtures/format3, the old writer's own
numbers). Tolerances: the same tensors evaluated by the same code, possibly with other memory layouts (a
stacked group vs single blocks), so float32 round-off (1e-6 relative); loaded tensors equal the saved ones
bitwise (a pure copy).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lalora
from lalora.fileformat import read_header
from models import randomize_lora_B, tiny_lora_llama, tiny_llama_config, token_batches
from reference import effective_weight_dense
from numerics import rel_diff

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIXTURES = Path(__file__).parent / "fixtures" / "format3"
TOL = 1e-6


def block_data_bytes(path) -> int:
    """Bytes of the curvature tensors in a precision file (its safetensors header: every ``block.`` key once)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.startswith("block."))


def expected_saving(layers: int, hidden: int, floats_per_factor=None) -> int:
    """Per layer: k and v reuse q's X, up reuses gate's X, each an ``hidden x hidden`` float32 factor."""
    floats = hidden * hidden if floats_per_factor is None else floats_per_factor
    return layers * 3 * 4 * floats


def _fit(backend, **options):
    model = tiny_lora_llama(targets=ALL, r=2)
    randomize_lora_B(model)
    return model, lalora.fit_precision(model, token_batches(), backend=backend, options={"curvature": "ef", **options},
                                       progress=False)


def _delta(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.1 * torch.randn(s, generator=g) for n, s in P.shapes.items()}


@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_shared_input_factors_are_stored_once_and_read_back_equal(backend, tmp_path):
    model, P = _fit(backend)
    cfg = tiny_llama_config()
    path = tmp_path / "p.lalora"
    P.save(path)
    assert block_data_bytes(path) == P.num_bytes - expected_saving(cfg.num_hidden_layers, cfg.hidden_size)
    blocks = read_header(path)["blocks"]
    by_param = {b["params"][0]: b["tensors"]["X"] for b in blocks}
    for layer in range(cfg.num_hidden_layers):
        key = {p: next(v for k, v in by_param.items() if f"layers.{layer}." in k and p in k) for p in ALL}
        assert key["q_proj"] == key["k_proj"] == key["v_proj"] and key["gate_proj"] == key["up_proj"]
        assert len({key["q_proj"], key["o_proj"], key["gate_proj"], key["down_proj"]}) == 4
    Q = lalora.Precision.load(path)
    for b, c in zip(P.blocks, Q.blocks):  # round trip: a pure copy
        assert b.params == c.params and all(torch.equal(t, c.tensors()[r]) for r, t in b.tensors().items())
    q, k = Q.blocks[0], Q.blocks[1]  # held once in memory too
    assert "k_proj" in k.params[0] and q.X.M.data_ptr() == k.X.M.data_ptr()
    delta = _delta(P)
    assert rel_diff(Q.quadratic(delta), P.quadratic(delta)) <= TOL
    mv_p, mv_q = P.matvec(delta), Q.matvec(delta)
    assert max(rel_diff(mv_q[n], mv_p[n]) for n in P.param_names) <= TOL
    for form in ("linearized", "effective-weight"):  # the penalty of a training step
        pens = []
        for prec in (P, Q):
            reg = lalora.LaLoRARegularizer(model, prec, strength=2.0, form=form, check_anchor=False)
            with torch.no_grad():
                for n, p in reg._params.items():
                    p.copy_(prec.anchor[n] + delta[n])
            pens.append(reg())
        assert rel_diff(pens[1], pens[0]) <= TOL


def test_low_rank_factors_are_shared_too(tmp_path):
    _, P = _fit("kfac", max_rank=4)
    cfg = tiny_llama_config()
    P.save(tmp_path / "p.lalora")
    n, k = cfg.hidden_size, 4  # low-rank X of side n: n k + k + n floats (U, s, d)
    assert block_data_bytes(tmp_path / "p.lalora") == P.num_bytes - expected_saving(cfg.num_hidden_layers, n, n * k + k + n)


def test_factors_that_differ_in_one_bit_are_not_shared(tmp_path):
    _, P = _fit("kfac")
    b = P.blocks[1]  # layer 0 k_proj: its X equals q_proj's; move one entry by one float32 step
    X = b.X.M.clone()
    X[0, 0] = torch.nextafter(X[0, 0], torch.tensor(float("inf")))
    P = lalora.Precision([P.blocks[0], type(b)(b.params, X, b.G, b.scaling), *P.blocks[2:]], P.anchor,
                         metadata=P.metadata)
    P.save(tmp_path / "p.lalora")
    keys = [blk["tensors"]["X"] for blk in read_header(tmp_path / "p.lalora")["blocks"]]
    assert keys[0] != keys[1] and keys[2] == keys[0]  # v still shares q's
    assert torch.equal(lalora.Precision.load(tmp_path / "p.lalora").blocks[1].X.M, X)


@pytest.mark.parametrize("name", ["kfac-all-linear", "tri-kfac-all-linear"])
def test_format3_files_written_before_sharing_still_load(name, tmp_path):
    path = FIXTURES / f"{name}.lalora"
    header = read_header(path)
    assert header["format_version"] == 3
    assert len({b["tensors"]["X"] for b in header["blocks"]}) == len(header["blocks"])  # one X copy per block
    P, want = lalora.Precision.load(path), load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    delta = {n: want[f"delta.{i}"] for i, n in enumerate(P.param_names)}
    dense = P.to_dense()
    assert rel_diff(dense @ want["probes"], want["dense_probes"]) <= TOL
    assert rel_diff(torch.diagonal(dense), want["dense_diagonal"]) <= TOL
    assert rel_diff(P.quadratic(delta), want["quadratic"][0]) <= TOL
    # written again: the duplicate copies go, the numbers stay
    P.save(tmp_path / "again.lalora")
    cfg = tiny_llama_config()
    assert block_data_bytes(tmp_path / "again.lalora") == block_data_bytes(path) - expected_saving(
        cfg.num_hidden_layers, cfg.hidden_size)
    Q = lalora.Precision.load(tmp_path / "again.lalora")
    assert rel_diff(Q.quadratic(delta), want["quadratic"][0]) <= TOL


def _group_x_bytes(reg) -> int:
    return sum(t.numel() * t.element_size() for n, t in reg.named_buffers() if n.startswith("group") and "_X" in n)


@pytest.mark.parametrize("loaded", [False, True], ids=["fitted (equal copies)", "loaded (one tensor)"])
@pytest.mark.parametrize("backend", ["kfac", "tri-kfac"])
def test_regularizer_holds_and_reads_each_shared_input_factor_once(backend, loaded, tmp_path):
    """The penalty's groups (lalora.penalty_groups) hold each distinct input factor once: per layer q/k/v share one,
    gate/up one, o and down their own (the bytes expected from the shapes), whether the copies are equal tensors
    (a fresh fit) or one tensor (a loaded file); penalty and gradient equal the per-block path of the unshared
    precision (autograd through ``Precision.quadratic`` / ``effective_quadratic``; rel. 1e-6, the same float32
    products in another order), in both forms, away from the anchor."""
    model, P = _fit(backend)
    if loaded:
        P.save(tmp_path / "p.lalora")
        P = lalora.Precision.load(tmp_path / "p.lalora")
    cfg = tiny_llama_config()
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    delta = _delta(P, seed=3)
    for form in ("linearized", "effective-weight"):
        reg = lalora.LaLoRARegularizer(model, P, strength=2.0, form=form, check_anchor=False)
        assert _group_x_bytes(reg) == 4 * L * (3 * h * h + i * i)  # qkv, o, gate/up of width h; down of width i
        assert sorted(len(g.slots) for g in reg._grouped.groups) == [1, 1, 2, 3]
        with torch.no_grad():
            for n, p in reg._params.items():
                p.copy_(P.anchor[n] + delta[n])
        params = [reg._params[n] for n in P.param_names]
        got = reg()
        g_got = torch.autograd.grad(got, params)
        theta = {n: (P.anchor[n] + delta[n]).requires_grad_(True) for n in P.param_names}
        if form == "linearized":
            q = P.quadratic({n: theta[n] - P.anchor[n] for n in P.param_names})
        else:
            q = torch.stack([b.effective_quadratic(theta) for b in P.blocks]).sum()
        ref = 0.5 * 2.0 * q
        g_ref = torch.autograd.grad(ref, [theta[n] for n in P.param_names])
        assert rel_diff(got, ref) <= TOL
        assert rel_diff(torch.cat([t.reshape(-1) for t in g_got]), torch.cat([t.reshape(-1) for t in g_ref])) <= TOL
        # float64 dense reference without lalora's forms: vec(d)^T D vec(d), or per adapter vec(Delta)^T kron(G, X)
        # vec(Delta) with Delta = s (B A - B0 A0) (tests/reference.py); rel. 1e-6 (float32 sums of these sizes)
        t64 = {n: (P.anchor[n] + delta[n]).double() for n in P.param_names}
        if form == "linearized":
            v = torch.cat([delta[n].reshape(-1) for n in P.param_names]).double()
            dense = v @ P.to_dense().double() @ v
        else:
            dense = sum(effective_weight_dense(b).double() @ w @ w for b in P.blocks
                        for w in [(b.scaling * (t64[b.params[1]] @ t64[b.params[0]]
                                                - P.anchor[b.params[1]].double() @ P.anchor[b.params[0]].double())).reshape(-1)])
        assert rel_diff(got, 0.5 * 2.0 * dense) <= TOL


def test_regularizer_does_not_share_factors_that_differ_in_one_bit():
    model, P = _fit("kfac")
    b = P.blocks[1]  # layer 0 k_proj (X equal to q_proj's)
    X = b.X.M.clone()
    X[0, 0] = torch.nextafter(X[0, 0], torch.tensor(float("inf")))
    P = lalora.Precision([P.blocks[0], type(b)(b.params, X, b.G, b.scaling), *P.blocks[2:]], P.anchor,
                         metadata=P.metadata)
    reg = lalora.LaLoRARegularizer(model, P, strength=1.0)
    cfg = tiny_llama_config()
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    assert _group_x_bytes(reg) + 4 * h * h * sum(1 for blk in reg._grouped.rest if hasattr(blk, "X")) == \
        4 * L * (3 * h * h + i * i) + 4 * h * h
    moved = next(blk for blk in reg.precision.blocks if blk.params == b.params)
    assert torch.equal(moved.X.dense(), X)

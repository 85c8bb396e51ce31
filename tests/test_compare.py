"""lalora.compare / compare_precisions / `lalora compare`: exact cases give zero error, approximations
do not, file-based results equal in-memory ones; the dense references are checked independently."""
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lalora
from lalora.blocks import DenseBlock
from lalora.comparison import CompareResult, compare, compare_precisions, dense_reference
from models import lora_mlp, randomize_lora_B, tiny_llama, tiny_lora_llama, token_batches
from reference import dense_empirical_fisher, rel_err

EXACT = 1e-9    # float64 dense precision against the same float64 reference
F32 = 1e-5      # float32 backends against float64 references
ACCURACY_KEYS = ("rel_err_random", "rel_err_eigen", "rel_err_displacement", "quad_displacement", "frobenius",
                 "cosine", "overlap_topk", "spectra")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: intra-op threads only add contention on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _backend_or_skip(name):
    try:
        return lalora.get_backend(name)
    except lalora.BackendError as e:
        pytest.skip(f"backend {name!r} not importable: {e}")


def _llama():
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    randomize_lora_B(model)
    return model, token_batches(n_batches=2, batch_size=3, pad=True, mask_prompt=True)


def _assert_same_accuracy(a: dict, b: dict, tol=1e-12):
    for key in ACCURACY_KEYS:
        assert (key in a) == (key in b), key
        if key not in a:
            continue
        va, vb = a[key], b[key]
        if isinstance(va, dict):
            assert va.keys() == vb.keys()
            pairs = [(x, y) for k in va for x, y in zip(*(v if isinstance(v, list) else [v] for v in (va[k], vb[k])))]
        elif isinstance(va, list):
            assert len(va) == len(vb)
            pairs = list(zip(va, vb))
        else:
            pairs = [(va, vb)]
        for x, y in pairs:
            if x != x:  # nan (zero block) on both sides
                assert y != y, key
            else:
                assert abs(x - y) <= tol * max(1.0, abs(y)), (key, x, y)


# --- the references ------------------------------------------------------------------------------
def test_ef_reference_is_the_one_reference_with_the_streams_counts():
    """``dense_reference`` wraps ``lalora.reference`` (checked against finite differences in test_reference.py)
    with fit_precision's counts; the deprecated implementation='builtin' warns and gives the same matrix."""
    model, batches = _llama()
    want = dense_empirical_fisher(model, batches)  # lalora.reference via tests/reference.py
    got = dense_reference(model, batches, "ef")
    assert rel_err(got.to_dense(), want) <= 1e-6  # symmetrised: round-off only
    assert got.metadata["num_examples"] == 6 and got.metadata["implementation"] == "lalora.reference"
    with pytest.warns(lalora.LaloraDeprecationWarning, match="builtin"):
        old = dense_reference(model, batches, "ef", implementation="builtin")
    assert rel_err(old.to_dense(), want) <= 1e-6


def test_reference_draws_only_the_batches_it_uses():
    """``max_batches``: the reference takes that many batches from the iterable and no more (a long DataLoader
    is not materialised); the same matrix as the first batches given as a list (the same computation)."""
    model, batches = _llama()
    drawn = []

    def endless():
        while True:
            drawn.append(1)
            yield batches[len(drawn) % 2]

    got = dense_reference(model, endless(), "ef", max_batches=2)
    want = dense_reference(model, [batches[1], batches[0]], "ef")
    assert len(drawn) == 2 and got.metadata["data_fingerprint"] == want.metadata["data_fingerprint"]
    assert rel_err(got.to_dense(), want.to_dense()) <= 1e-6  # the same batches and code: round-off at most


def test_ggn_reference_matches_finite_differences():
    """d^T G d = (1/N) sum_n (J d)^T H (J d) with J d from central differences (float64 MLP)."""
    model = lora_mlp().double()
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    ref = dense_reference(model, [(x, y)], "ggn")
    G = ref.to_dense()
    params = list(lalora.find_lora_adapters(model)[0].params().values()) + list(lalora.find_lora_adapters(model)[1].params().values())
    d = torch.randn(G.shape[0], generator=g, dtype=torch.float64)

    def shift(s):
        i = 0
        with torch.no_grad():
            for p in params:
                p.add_(s * d[i:i + p.numel()].reshape(p.shape))
                i += p.numel()

    eps = 1e-6
    with torch.no_grad():
        f0 = model(x)
        shift(eps); fp = model(x); shift(-2 * eps); fm = model(x); shift(eps)
    jd = (fp - fm) / (2 * eps)
    p = torch.softmax(f0, -1)
    want = float(((p * jd ** 2).sum(-1) - (p * jd).sum(-1) ** 2).mean())
    assert abs(float(d @ G @ d) - want) <= 1e-7 * want


# --- exactness --------------------------------------------------------------------------------------
def test_precision_equal_to_reference_has_zero_error(tmp_path):
    model, batches = _llama()
    ref = dense_reference(model, batches, "ef")
    R = ref.to_dense()
    names = tuple(ref.param_names)
    # the same matrix as a sum of two overlapping dense blocks: the evaluation goes through the blocks
    same = lalora.Precision([DenseBlock(names, 0.25 * R, ref.shapes), DenseBlock(names, 0.75 * R, ref.shapes)], ref.anchor)
    theta_T = {n: t + 0.05 * torch.randn(t.shape) for n, t in ref.anchor.items()}
    res = compare_precisions([same], reference=ref, labels=["exact"], displacement=theta_T, directions=8, top_k=4)
    row = res.row("exact")
    assert max(row["rel_err_random"]) <= EXACT and max(row["rel_err_eigen"]) <= EXACT
    assert row["rel_err_displacement"] <= EXACT
    assert row["frobenius_all"] <= EXACT and all(v <= EXACT for v in row["frobenius"].values())
    assert abs(row["cosine_all"] - 1) <= 1e-9
    assert len(row["rel_err_eigen"]) == 4 and len(row["rel_err_random"]) == 8


def _single_linear_mse():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3))
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights="orthogonal"))
    randomize_lora_B(model)
    x = torch.randn(1, 4)
    y = torch.randn(1, 3)
    return model, [(x, y)]


@pytest.mark.parametrize("name", ["kfac", "tri-kfac"])
def test_kfac_exact_on_single_linear_layer_mse_one_example(name):
    """One example, one linear layer, MSE: G (x) X is exact for each LoRA matrix (kfac) and for the
    whole adapter including A-B cross terms (tri-kfac)."""
    cls = _backend_or_skip(name)
    options = {}
    if "ef" in cls.curvatures():  # exact only with the type-2 / empirical factors, not MC
        options["curvature"] = "ef"
    model, data = _single_linear_mse()
    kind = cls(**options).curvature_kind()
    res = compare(model, data, backends=[(name, name, options)], reference="ef" if kind == "ef" else "ggn",
                  loss="mse", directions=8)
    row = res.row(name)
    assert row["status"] == "ok", row.get("error")
    for block, err in row["frobenius"].items():
        if block != "all":
            assert err <= F32, (block, err)
    if name == "kfac":  # block-diagonal per LoRA matrix: the A-B cross terms are missing from "all"
        assert row["frobenius_all"] > 0.1
    else:
        assert row["rel_err_eigen"] and max(row["rel_err_eigen"]) <= F32
        # Not the random directions: one example makes R rank 1, so d^T R d = (g.d)^2 is tiny for some
        # random d and float32-stored factors (entry error ~1e-7 |R|) give relative errors ~1e-5 there.
        assert row["frobenius_all"] <= F32


# --- approximations must show their error ----------------------------------------------------------
def test_diag_has_nonzero_error_against_dense_ef():
    model, batches = _llama()
    res = compare(model, batches, backends=["diag"], reference="ef", directions=16, top_k=4)
    row = res.row("diag")
    ref = dense_reference(model, batches, "ef").to_dense()
    off = ref - torch.diag(torch.diagonal(ref))
    assert float(off.norm() / ref.norm()) > 0.5  # the EF has off-diagonal mass ...
    # ... that diag drops (it is exact on the diagonal, so the error is the off-diagonal part)
    assert abs(row["frobenius_all"] - float(off.norm() / ref.norm())) <= F32
    assert row["rel_err_random_mean"] > 0.1 and row["rel_err_eigen_mean"] > 0.1
    assert row["cosine_all"] < 0.95
    assert row["num_bytes"] == 4 * sum(t.numel() for t in lalora.fit_precision(model, batches, progress=False).anchor.values())
    assert row["file_bytes"] > row["num_bytes"] and row["seconds"] > 0 and row["peak_memory_bytes"] is not None
    assert row["memory_method"] in ("rss_sampled", "ru_maxrss_delta", "cuda_max_memory_allocated")
    assert "diag" in res.table() and "| diag |" in res.to_markdown()


# --- file-based == in-memory ----------------------------------------------------------------------
def test_file_based_comparison_equals_in_memory(tmp_path):
    model, batches = _llama()
    backends = ["diag"]
    try:
        lalora.get_backend("block")
        backends.append("block")
    except lalora.BackendError:
        pass
    theta_T = {n: p.detach() + 0.02 * torch.randn(p.shape) for n, p in
               lalora.adapters.lora_parameters(lalora.find_lora_adapters(model)).items()}
    live = compare(model, batches, backends=backends, reference="ef", displacement=theta_T, directions=6, top_k=3,
                   save_dir=tmp_path)
    files = [tmp_path / f"{b}.lalora" for b in backends]
    stored = compare_precisions(files, reference=tmp_path / "reference-ef.lalora", displacement=theta_T,
                                directions=6, top_k=3)
    in_memory = compare_precisions([lalora.Precision.load(f) for f in files], labels=backends,
                                   reference=lalora.Precision.load(tmp_path / "reference-ef.lalora"),
                                   displacement=theta_T, directions=6, top_k=3)
    for b in backends:
        assert live.row(b)["status"] == "ok", live.row(b).get("error")
        _assert_same_accuracy(stored.row(b), live.row(b))
        _assert_same_accuracy(in_memory.row(b), live.row(b))
        assert stored.row(b)["file_bytes"] == live.row(b)["file_bytes"] == in_memory.row(b)["file_bytes"]
        assert stored.row(b)["num_bytes"] == live.row(b)["num_bytes"]
    # the displacement given three ways: dict, a precision anchored at theta_T, a peft adapter dir
    anchored = lalora.Precision.load(files[0]).with_anchor(theta_T)
    anchored.save(tmp_path / "finetuned.lalora")
    with torch.no_grad():
        for n, p in lalora.adapters.lora_parameters(lalora.find_lora_adapters(model)).items():
            p.copy_(theta_T[n])
    model.save_pretrained(tmp_path / "adapter")
    for disp in (tmp_path / "finetuned.lalora", tmp_path / "adapter"):
        r = compare_precisions(files[:1], reference=tmp_path / "reference-ef.lalora", displacement=disp,
                               directions=6, top_k=3)
        assert abs(r.rows[0]["rel_err_displacement"] - live.rows[0]["rel_err_displacement"]) <= 1e-9
    # JSON round trip keeps the numbers
    back = CompareResult.from_json(live.to_json())
    _assert_same_accuracy(back.row("diag"), live.row("diag"))


# --- robustness of the tool ----------------------------------------------------------------------
def test_unavailable_backend_and_unaffordable_reference_do_not_abort():
    model, batches = _llama()
    res = compare(model, batches, backends=["diag", "no-such-backend"], max_reference_params=10)
    assert res.reference is None and "max_reference_params" in res.settings["reference_note"]
    assert res.row("no-such-backend")["status"] == "unavailable"
    row = res.row("diag")
    assert row["status"] == "ok" and row["num_bytes"] > 0 and "rel_err_random_mean" not in row
    assert "no-such-backend" in res.table()
    # lalora.compare is the function itself (the package is lalora.comparison): importing the package does
    # not rebind it
    import lalora.comparison

    assert lalora.compare is compare and lalora.compare_precisions is compare_precisions
    res = lalora.compare(model, batches, backends=["diag"], reference=None)
    assert res.reference is None and res.rows[0]["status"] == "ok"


def test_zero_curvature_blocks_are_reported_not_nan_errors():
    """peft's default init (B = 0): A has zero curvature in the reference and in diag."""
    model = tiny_lora_llama(init=True)
    batches = token_batches(n_batches=1, batch_size=3)
    res = compare(model, batches, backends=["diag"], reference="ef", directions=4, top_k=2)
    row = res.row("diag")
    a_blocks = [b for b in res.blocks if b.endswith("lora_A")]
    assert all(row["frobenius"][b] == 0.0 for b in a_blocks)
    assert any("zero curvature" in n for n in row["notes"])
    json.loads(res.to_json())  # nan cosines of zero blocks become null


def test_cli_stored_precisions_equal_python(tmp_path, capsys):
    """`lalora compare a.lalora --reference r.lalora` (through the `lalora` entry) gives the numbers of
    `compare`; bad inputs exit 2 with the file or flag named."""
    from lalora.cli import main

    model = lora_mlp(targets=("fc2",))
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]))]
    res = compare(model, data, backends=["diag"], reference="ggn", directions=4, top_k=2, save_dir=tmp_path)
    args = [str(tmp_path / "diag.lalora"), "--reference", str(tmp_path / "reference-ggn.lalora"), "--directions", "4",
            "--top-k", "2"]
    rc = main(["compare", *args, "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    assert rc == 0
    stored = CompareResult.from_json(tmp_path / "r.json")
    _assert_same_accuracy(stored.row("diag"), res.row("diag"))
    assert (tmp_path / "p.png").stat().st_size > 1000 and (tmp_path / "p_spectra.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "diag" in out and "exact dense ggn over" in out
    assert main(["compare", *args, "--out", str(tmp_path / "r.md")]) == 0  # a Markdown --out
    assert "| diag |" in (tmp_path / "r.md").read_text()
    capsys.readouterr()
    for bad, named in [([str(tmp_path / "absent.lalora")], "absent.lalora"),
                       ([*args, "--out", str(tmp_path / "r.txt")], "--out"),
                       ([str(tmp_path / "diag.lalora"), "--reference", "ggn"], "--model and --data"),
                       ([str(tmp_path / "diag.lalora"), "--reference", str(tmp_path / "nope.lalora")], "nope.lalora"),
                       ([str(tmp_path / "diag.lalora"), "--displacement", str(tmp_path / "gone")], "--displacement"),
                       ([str(tmp_path / "p.png")], "p.png"),  # not a precision file
                       (["--backends", "diag"], "--model and --data")]:
        assert main(["compare", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert "lalora compare: error:" in err and named in err, (bad, err)

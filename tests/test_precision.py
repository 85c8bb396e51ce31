"""Precision algebra, the regularizer penalty and its gradient against dense matrices, file round trips."""
import pytest
import torch

import lalora
from lalora.blocks import DenseBlock, DiagBlock
from models import lora_mlp, randomize_lora_B, tiny_lora_llama, token_batches
from reference import rel_err

TOL = 1e-6


def _random_precision(model, seed=0):
    """Overlapping diag + dense blocks over the model's LoRA weights (a generic, non-diagonal F)."""
    g = torch.Generator().manual_seed(seed)
    params = lalora.find_lora_adapters(model)
    anchor = {}
    for a in params:
        anchor[a.a_name] = a.A.detach().float().clone()
        anchor[a.b_name] = a.B.detach().float().clone()
    names = list(anchor)
    blocks = [DiagBlock(n, torch.rand(anchor[n].shape, generator=g)) for n in names]
    pair = names[:2]
    n = sum(anchor[p].numel() for p in pair)
    M = torch.randn(n, n, generator=g)
    blocks.append(DenseBlock(tuple(pair), M @ M.T / n, {p: anchor[p].shape for p in pair}))
    return lalora.Precision(blocks, anchor, metadata={"note": "random"})


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names]).double()


def test_quadratic_and_matvec_match_dense():
    model = tiny_lora_llama()
    P = _random_precision(model)
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(s, generator=g) for n, s in P.shapes.items()}
    D = P.to_dense()
    v = _flat(delta, P.param_names)
    assert rel_err(P.quadratic(delta), v @ D @ v) <= TOL
    assert rel_err(_flat(P.matvec(delta), P.param_names), D @ v) <= TOL


def test_add_and_scale():
    model = tiny_lora_llama()
    P, Q = _random_precision(model, 0), _random_precision(model, 1)
    assert rel_err((P + Q).to_dense(), P.to_dense() + Q.to_dense()) <= TOL
    assert rel_err((2.5 * P).to_dense(), 2.5 * P.to_dense()) <= TOL
    assert rel_err((P * 0.5).to_dense(), 0.5 * P.to_dense()) <= TOL
    moved = Q.with_anchor({n: t + 1 for n, t in Q.anchor.items()})
    with pytest.raises(ValueError, match="different anchors"):
        P + moved
    with pytest.raises(ValueError, match="non-negative"):
        -1.0 * P


@pytest.mark.parametrize("prior", [0.0, 0.3])
def test_penalty_and_gradient_match_dense(prior):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    P = _random_precision(model)
    reg = lalora.LaLoRARegularizer(model, P, strength=7.0, prior_precision=prior)
    assert float(reg().detach()) == 0.0  # at the anchor
    params = lalora.adapters.lora_parameters(lalora.find_lora_adapters(model))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    penalty = reg()
    grads = torch.autograd.grad(penalty, list(params.values()))
    D = P.to_dense() + prior * torch.eye(P.num_params, dtype=torch.float64)
    d = torch.cat([(p.detach().double() - P.anchor[n].double()).reshape(-1) for n, p in params.items()])
    assert rel_err(penalty, 3.5 * d @ D @ d) <= TOL
    assert rel_err(torch.cat([x.reshape(-1) for x in grads]), 7.0 * D @ d) <= 1e-5


def test_save_load_bitwise_and_rewrapped_model(tmp_path):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    P = lalora.fit_precision(model, token_batches(), backend="diag", progress=False, prior_precision=0.1)
    path = tmp_path / "p.lalora"
    P.save(path)
    # a freshly built model with the same seed, another adapter name and without the peft wrapper prefix
    fresh = tiny_lora_llama(adapter_name="renamed")
    randomize_lora_B(fresh)
    Q = lalora.Precision.load(path, model=fresh)
    assert Q.param_names == P.param_names and Q.prior_precision == 0.1
    for a, b in zip(P.blocks, Q.blocks):
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert all(torch.equal(P.anchor[n], Q.anchor[n]) for n in P.param_names)
    assert Q.metadata["num_examples"] == P.metadata["num_examples"]
    reg = lalora.LaLoRARegularizer(fresh, Q, strength=1.0)  # anchor matches the fresh model
    assert float(reg().detach()) == 0.0
    # the bare LoraModel (no PeftModel wrapper) gives the same canonical names
    lalora.Precision.load(path, model=fresh.base_model)
    # a file written twice is byte-identical
    P.save(tmp_path / "q.lalora")
    assert (tmp_path / "q.lalora").read_bytes() == path.read_bytes()


def test_load_rejects_other_model(tmp_path):
    model = tiny_lora_llama()
    P = lalora.fit_precision(model, token_batches(), backend="diag", progress=False)
    P.save(tmp_path / "p.lalora")
    other_rank = tiny_lora_llama(r=4)
    with pytest.raises(lalora.ModelMismatchError, match="lora_A"):
        lalora.Precision.load(tmp_path / "p.lalora", model=other_rank)
    other_targets = tiny_lora_llama(targets=("q_proj",))
    with pytest.raises(lalora.ModelMismatchError, match="v_proj"):
        lalora.Precision.load(tmp_path / "p.lalora", model=other_targets)
    with pytest.warns(UserWarning, match="partially"):
        partial = lalora.Precision.load(tmp_path / "p.lalora", model=other_targets, strict=False)
    assert all("q_proj" in n for n in partial.param_names)
    other_base = tiny_lora_llama(hidden_size=16, intermediate_size=32)
    with pytest.raises(lalora.ModelMismatchError, match="config hash"):
        lalora.Precision.load(tmp_path / "p.lalora", model=other_base)


def test_load_rejects_foreign_and_truncated_files(tmp_path):
    bad = tmp_path / "x.lalora"
    bad.write_bytes(b"hello world, not safetensors")
    with pytest.raises(lalora.PrecisionFileError):
        lalora.Precision.load(bad)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(lalora.PrecisionFileError, match="not a lalora precision"):
        lalora.Precision.load(tmp_path / "plain.safetensors")
    model = tiny_lora_llama()
    P = lalora.fit_precision(model, token_batches(), backend="diag", progress=False)
    P.save(tmp_path / "p.lalora")
    data = (tmp_path / "p.lalora").read_bytes()
    (tmp_path / "t.lalora").write_bytes(data[:-10])
    with pytest.raises(lalora.PrecisionFileError):
        lalora.Precision.load(tmp_path / "t.lalora")
    with pytest.raises(lalora.PrecisionFileError, match="does not exist"):
        lalora.Precision.load(tmp_path / "missing.lalora")


def test_regularizer_anchor_check_and_reset():
    model = tiny_lora_llama()
    randomize_lora_B(model)
    P = lalora.fit_precision(model, token_batches(), backend="diag", progress=False)
    randomize_lora_B(model, seed=9)
    with pytest.raises(lalora.AnchorMismatchError, match="lora_B"):
        lalora.LaLoRARegularizer(model, P, strength=1.0)
    reg = lalora.LaLoRARegularizer(model, P, strength=1.0, check_anchor=False)
    assert float(reg().detach()) > 0
    reg.reset_to_anchor()
    assert float(reg().detach()) == 0.0
    reg.check_anchor()


def test_mlp_classification_and_mse_losses():
    """Non-HF models: (x, y) batches pick classification (integer y) or MSE (float y) under loss='auto'."""
    model = lora_mlp()
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    y_cls = torch.randint(0, 3, (6,), generator=g)
    y_reg = torch.randn(6, 3, generator=g)
    params = lalora.adapters.lora_parameters(lalora.find_lora_adapters(model))
    for y, fn in [(y_cls, lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="sum")),
                  (y_reg, lambda o, t: (o - t).square().sum())]:
        P = lalora.fit_precision(model, [(x, y)], backend="diag", progress=False)
        rows = []
        for n in range(6):
            gr = torch.autograd.grad(fn(model(x[n:n + 1]), y[n:n + 1]), list(params.values()))
            rows.append(torch.cat([t.reshape(-1) for t in gr]).double())
        G = torch.stack(rows)
        assert rel_err(torch.diagonal(P.to_dense()), (G ** 2).mean(0)) <= 1e-5


def test_summary_mentions_structure_and_zero_blocks():
    model = tiny_lora_llama(init=True)
    with pytest.warns(lalora.ZeroCurvatureWarning):
        P = lalora.fit_precision(model, token_batches(), backend="diag", progress=False)
    text = P.summary()
    assert "structure diag" in text and "ZERO curvature" in text and "curvature=ef" in text


def test_hf_sequence_classification_batches():
    """HF dict batches with 1-D labels use the classification loss under loss='auto'."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from models import tiny_llama_config

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights="orthogonal", task_type="SEQ_CLS"))
    randomize_lora_B(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (4, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1, 2])}
    P = lalora.fit_precision(model, [batch], backend="diag", progress=False, others="none")  # LoRA only
    assert P.metadata["loss"] == "classification" and P.metadata["num_examples"] == 4
    params = lalora.adapters.lora_parameters(lalora.find_lora_adapters(model))
    names = [n for n in P.param_names]
    rows = []
    for n in range(4):
        logits = model(input_ids=ids[n:n + 1]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"][n:n + 1], reduction="sum")
        gr = torch.autograd.grad(loss, [params[k] for k in names])
        rows.append(torch.cat([t.reshape(-1) for t in gr]).double())
    assert rel_err(torch.diagonal(P.to_dense()), (torch.stack(rows) ** 2).mean(0)) <= 1e-5


def test_save_block_sharing_memory_with_anchor(tmp_path):
    """A block built from the anchor tensors themselves (no clone) saves and loads."""
    t = torch.rand(3, 4) + 0.1
    P = lalora.Precision([lalora.DiagBlock("w", t)], {"w": t})
    P.save(tmp_path / "p.lalora")
    Q = lalora.Precision.load(tmp_path / "p.lalora")
    assert torch.equal(Q.anchor["w"], t) and torch.equal(Q.diagonal()["w"], t)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_validate_refuses_nonfinite_entries_anywhere(bad, where):
    """``all_finite`` (min/max of the tensor) finds one NaN or +-Inf entry at any position, in a diag
    block and in a (600, 600) dense block (several vectorised chunks)."""
    for n in (7, 600):
        curv = torch.ones(n) if n == 7 else torch.eye(n)
        flat = curv.view(-1)
        flat[{"first": 0, "middle": flat.numel() // 2 + 1, "last": flat.numel() - 1}[where]] = bad
        block = DiagBlock("w", curv) if n == 7 else DenseBlock(("w",), curv, {"w": (600,)})
        with pytest.raises(ValueError, match="NaN or Inf"):
            block.validate({"w": (7,) if n == 7 else (600,)})

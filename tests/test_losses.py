"""The one loss path (``lalora.losses``): its curvature building blocks against autograd, its relabelling and
the hidden-state loss against the plain per-example loss.

References: ``torch.func.hessian`` / ``torch.autograd.grad`` of the plain loss, float64 where a formula is
checked (1e-12: round-off of a few float64 operations); float32 forwards compared with each other: 1e-6.
"""
import pytest
import torch
import torch.nn.functional as F

from lalora.losses import CausalLMLoss, ClassificationLoss, MSELoss
from numerics import rel_close
from models import labelled_sequences, pad_batch, randomize_lora_B, tiny_lora_llama

LOSSES = {"categorical": ClassificationLoss(), "gaussian": MSELoss()}


def _rows(seed=0, M=4, C=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, C, generator=g, dtype=torch.float64), torch.randint(0, C, (M,), generator=g)


@pytest.mark.parametrize("likelihood", list(LOSSES))
def test_output_hessian_and_its_square_root_are_the_autograd_hessian(likelihood):
    loss = LOSSES[likelihood]
    z, y = _rows()
    if likelihood == "categorical":
        row_loss = lambda r, t: F.cross_entropy(r[None], t[None], reduction="sum")  # noqa: E731
    else:
        y = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        row_loss = lambda r, t: (r - t).square().sum()  # noqa: E731
    want = torch.func.vmap(torch.func.hessian(row_loss))(z, y)
    H = loss.output_hessian(z)
    assert float((H - want).abs().max()) <= 1e-12
    cols = torch.stack([loss.hessian_sqrt_column(z, c) for c in range(z.shape[1])])  # (C, M, C)
    assert float((torch.einsum("cmi,cmj->mij", cols, cols) - want).abs().max()) <= 1e-12
    J = torch.randn(z.shape[0], z.shape[1], 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert float((loss.hessian_sandwich(J, z) - torch.einsum("mcn,mcd,mdk->nk", J, want, J)).abs().max()) <= 1e-12


def _lm_batch():
    model = tiny_lora_llama()
    randomize_lora_B(model)
    raw = pad_batch(labelled_sequences()[:4], "left")
    loss = CausalLMLoss()
    return model, loss, loss.prepare(raw)


def test_row_gradient_is_the_gradient_of_the_per_example_loss():
    """``row_gradient`` (what kfac feeds into the output rows) = autograd of ``sum_n l_n`` w.r.t. the rows,
    on a left-padded causal-LM batch (rows without a target: zero)."""
    model, loss, b = _lm_batch()
    with torch.no_grad():
        logits = model(**b.inputs).logits.requires_grad_()
    rows, keep = loss.output_rows(logits, b)
    (want,) = torch.autograd.grad(loss.per_example(logits, b).sum(), logits)
    want = want.reshape(rows.shape)
    got = loss.row_gradient(torch.softmax(rows.detach(), -1), loss.row_targets(logits, b), keep)
    assert float((got - want).abs().max()) <= 1e-6  # float32 (per_example's dtype), entries in [-1, 1]
    assert bool((got[~keep] == 0).all()) and int(keep.sum()) == int(loss.labelled_counts(b).sum())


def test_with_row_targets_gives_the_loss_of_the_new_targets():
    model, loss, b = _lm_batch()
    with torch.no_grad():
        logits = model(**b.inputs).logits
    rows, keep = loss.output_rows(logits, b)
    same = loss.with_row_targets(b, loss.row_targets(logits, b))
    assert rel_close(loss.per_example(logits, same), loss.per_example(logits, b))
    other = torch.randint(0, rows.shape[1], (rows.shape[0],), generator=torch.Generator().manual_seed(0))
    want = torch.zeros(b.size).index_add(
        0, torch.arange(b.size).repeat_interleave(logits.shape[1])[keep],
        F.cross_entropy(rows[keep].float(), other[keep], reduction="none"))
    got = loss.per_example(logits, loss.with_row_targets(b, other))
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())  # float32 sums in another order
    c = ClassificationLoss()
    cb = c.prepare((torch.zeros(3, 2), torch.tensor([1, -100, 0])))
    assert torch.equal(c.with_row_targets(cb, torch.tensor([2, 2, 2])).labels, torch.tensor([2, -100, 2]))


def test_per_example_from_hidden_equals_per_example_of_the_logits():
    """The benchmark's training loss: ``lm_head`` on the positions with a target only."""
    model, loss, b = _lm_batch()
    base = model.get_base_model()
    with torch.no_grad():
        hidden = base.model(**b.inputs).last_hidden_state
        want = loss.per_example(base.lm_head(hidden), b)
        got = loss.per_example_from_hidden(hidden, base.lm_head, b)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())

"""The one exact reference (``lalora.reference``) against checks that share none of its code.

Every curvature test compares a backend with ``lalora.reference``; here the reference itself is checked
against the definition computed another way: quadratic forms ``d^T F d`` from central finite differences
(no autograd: the EF's directional derivatives ``g_n . d``, the GGN's ``J d``) of the loss / logits of each
example alone, unpadded, built from the example list (no cutting, no padding rule); the loss written out
here is checked against transformers' own (``model(**batch).loss``: its label shift and ignore rule).
Float64 models, so the central differences (step 1e-5, error O(eps^2) ~ 1e-10 relative, round-off
~ 1e-16 / 1e-5 = 1e-11) are the only error: tolerance 1e-7.
"""
import torch

from lalora.reference import dense_empirical_fisher, dense_ggn, unpadded_example
from models import labelled_sequences, pad_batch, randomize_lora_B, tiny_lora_gpt2

EPS = 1e-5
TOL = 1e-7


def _lora_tensors(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _shift(tensors, d, s):
    i = 0
    with torch.no_grad():
        for p in tensors:
            p.add_(s * d[i:i + p.numel()].reshape(p.shape))
            i += p.numel()


def _example_losses(model, examples):
    """``l_n`` of every example with a target, alone: the next-token cross-entropy of the logits at position t
    against token t + 1, summed over labels != -100, float64."""
    out = []
    for ids, labels in examples:
        if bool((labels[1:] != -100).any()):
            logits = model(input_ids=ids[None]).logits[0, :-1]
            out.append(torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
    return torch.stack(out)


def _hf_example_losses(model, examples):
    """The same from transformers' own loss (its own label shift and ignore rule): its mean over the
    example's targets times their number; transformers computes it in float32."""
    return torch.stack([model(input_ids=ids[None], labels=labels[None]).loss * int((labels[1:] != -100).sum())
                        for ids, labels in examples if bool((labels[1:] != -100).any())])


def _direction(P, seed=1):
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_ef_equals_finite_differences_of_the_models_own_loss():
    """Padded batches (left and right) in, ``d^T EF d = (1/N) sum_n (d l_n / d theta . d)^2`` out, with the
    directional derivatives by central differences of transformers' loss on the unpadded examples."""
    model = tiny_lora_gpt2(dtype=torch.float64)  # GPT-2: float64 throughout (Llama's RMSNorm computes in float32)
    randomize_lora_B(model)
    ex = labelled_sequences()
    batches = [pad_batch(ex[:3], "left", position_ids=True), pad_batch(ex[3:], "right")]
    F = dense_empirical_fisher(model, batches)
    tensors = _lora_tensors(model)
    d = _direction(F.shape[0])
    with torch.no_grad():
        # the loss written out here is transformers' (label shift, -100): float32 round-off, 1e-6
        assert float((_example_losses(model, ex) - _hf_example_losses(model, ex)).abs().max()) <= 1e-6
        _shift(tensors, d, EPS)
        plus = _example_losses(model, ex)
        _shift(tensors, d, -2 * EPS)
        minus = _example_losses(model, ex)
        _shift(tensors, d, EPS)
    want = float((((plus - minus) / (2 * EPS)) ** 2).mean())
    assert len(plus) == 5  # the example labelled only at its first token has no target
    assert abs(float(d @ F @ d) - want) <= TOL * want


def test_ggn_equals_finite_differences_of_the_logits():
    """``d^T GGN d = (1/N) sum_n sum_t (J d)^T (diag(p) - p p^T) (J d)`` with ``J d`` by central differences of
    the logits of each example alone (GPT-2, left padding with position ids in the batch)."""
    model = tiny_lora_gpt2(dtype=torch.float64, vocab_size=8)
    randomize_lora_B(model)
    ex = labelled_sequences(vocab=8)
    G = dense_ggn(model, [pad_batch(ex, "left", position_ids=True)])
    tensors = _lora_tensors(model)
    d = _direction(G.shape[0], seed=2)
    total, N = 0.0, 0
    with torch.no_grad():
        for ids, labels in ex:
            rows = (labels[1:] != -100).nonzero().flatten()  # position t predicts token t + 1
            if not len(rows):
                continue
            z0 = model(input_ids=ids[None]).logits[0, rows]
            _shift(tensors, d, EPS)
            zp = model(input_ids=ids[None]).logits[0, rows]
            _shift(tensors, d, -2 * EPS)
            zm = model(input_ids=ids[None]).logits[0, rows]
            _shift(tensors, d, EPS)
            jd, p = (zp - zm) / (2 * EPS), torch.softmax(z0, -1)
            total += float(((p * jd ** 2).sum(-1) - (p * jd).sum(-1) ** 2).sum())
            N += 1
    want = total / N
    assert N == 5
    assert abs(float(d @ G @ d) - want) <= TOL * want


def test_unpadded_example_removes_pad_positions_from_every_per_token_input():
    ex = labelled_sequences()
    batch = pad_batch(ex[:3], "left", position_ids=True)
    for n, (ids, labels) in enumerate(ex[:3]):
        one = unpadded_example(batch, n)
        assert torch.equal(one["input_ids"][0], ids) and torch.equal(one["labels"][0], labels)
        assert torch.equal(one["position_ids"][0], torch.arange(len(ids)))
        assert bool((one["attention_mask"] == 1).all())

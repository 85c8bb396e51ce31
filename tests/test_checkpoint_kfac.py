"""Checkpointed ``kfac`` / ``tri-kfac`` fits resume to the uninterrupted result, bitwise.

The state is the float64 factor sums (``sum.<adapter>.<X|G|T>``, the float32 window sums flushed
into them at each checkpoint) and, for ``curvature="mc"``, the label-sampling generator: a resumed MC fit must draw the same labels for the remaining
batches as the uninterrupted one.
"""
import warnings

import pytest
import torch

import lalora
from numerics import rel_close, rel_diff
from models import randomize_lora_B, tiny_lora_llama, token_batches
from test_robustness import _count_forwards, _FlakyData, _Interrupted


def _fit(model, data, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lalora.ZeroCurvatureWarning)
        return lalora.fit_precision(model, data, backend, progress=False, **kw)


@pytest.mark.parametrize("backend,options", [("kfac", {"curvature": "mc", "mc_samples": 2}),
                                             ("tri-kfac", {"curvature": "ef", "kfac_approx": "reduce"})],
                         ids=["kfac-mc", "tri-kfac-empirical-reduce"])
def test_checkpointed_fit_resumes_to_the_uninterrupted_result(tmp_path, backend, options):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    batches = token_batches(7, seed=4)
    batches[3]["labels"][:] = -100  # a batch without labels inside the consumed part
    # the uninterrupted fit with the same checkpointing: the float32 window sums are flushed into the
    # float64 sums at every checkpoint, so checkpointing itself changes the result at float32 rounding
    reference = _fit(model, batches, backend, checkpoint_dir=tmp_path / "ref", checkpoint_every=2, options=options)
    unchecked = _fit(model, batches, backend, options=options)
    for b1, b2 in zip(reference.blocks, unchecked.blocks):
        for k, t in b1.tensors().items():
            assert float((t - b2.tensors()[k]).abs().max()) <= 1e-6 * float(t.abs().max()), k
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupted):
        _fit(model, _FlakyData(batches, fail_after=5), backend, checkpoint_dir=ckpt, checkpoint_every=2, options=options)
    assert sorted(p.name for p in ckpt.iterdir()) == ["fit-checkpoint.safetensors"]
    calls = _count_forwards(model)
    resumed = _fit(model, _FlakyData(batches), backend, checkpoint_dir=ckpt, checkpoint_every=2, options=options)
    assert calls["n"] == 2  # batches 5 and 6 only
    assert resumed.metadata["resumed_from_batch"] == 5
    for b1, b2 in zip(resumed.blocks, reference.blocks):  # float64 sums and generator state restored: round-off only
        for k, t in b1.tensors().items():
            assert rel_close(t, b2.tensors()[k]), (k, rel_diff(t, b2.tensors()[k]))
    for k in ("num_examples", "num_tokens", "num_batches", "skipped_examples", "data_fingerprint"):
        assert resumed.metadata[k] == reference.metadata[k], k
    assert list(ckpt.iterdir()) == []


def test_state_is_checked(tmp_path):
    backend = lalora.get_backend("kfac")()
    with pytest.raises(lalora.BackendError, match="unexpected entry 'sum.x.Q'"):
        backend.load_state_dict({"sum.x.Q": torch.zeros(2, dtype=torch.float64), "rng": torch.Generator().get_state()})
    with pytest.raises(lalora.BackendError, match="no 'rng' entry"):
        backend.load_state_dict({"sum.x.X": torch.zeros(2, 2, dtype=torch.float64)})
    backend.load_state_dict({"sum.not.a.layer.X": torch.zeros(2, 2, dtype=torch.float64),
                             "rng": torch.Generator().get_state()})
    with pytest.raises(lalora.BackendError, match="adapter 'not.a.layer'.*does not have"):
        _fit(tiny_lora_llama(), token_batches(1), backend)

"""Reliability and security (issue 10): hostile precision files, atomic saves, non-finite
losses, bad data, model mismatch, checkpointed fits. See docs/robustness.md.

Fuzz budget: the hypothesis profile ``lalora-ci`` (default, ~10 s) or ``lalora-dev``
(``LALORA_FUZZ=dev``, many more cases); every case must end in ``PrecisionFileError`` or
load a precision *identical* to the original (a no-op mutation).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lalora
from lalora import atomic_file, fileformat
from lalora.blocks import DenseBlock, DiagBlock
from models import lora_mlp, randomize_lora_B, tiny_lora_llama, token_batches
from numerics import F32, rel_close

settings.register_profile("lalora-ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("lalora-dev", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_PROFILE = "lalora-dev" if os.environ.get("LALORA_FUZZ") == "dev" else "lalora-ci"
FUZZ_CASES = {"count": 0}


# --------------------------------------------------------------------------------------
# 1. precision files
# --------------------------------------------------------------------------------------
def _small_precision() -> lalora.Precision:
    """Diag blocks on every LoRA matrix of a LoRA MLP plus one dense block over two of them."""
    model = lora_mlp()
    randomize_lora_B(model)
    anchor = {}
    for a in lalora.find_lora_adapters(model):
        anchor[a.a_name] = a.A.detach().float().clone()
        anchor[a.b_name] = a.B.detach().float().clone()
    g = torch.Generator().manual_seed(0)
    names = list(anchor)
    blocks = [DiagBlock(n, torch.rand(anchor[n].shape, generator=g)) for n in names]
    pair = names[:2]
    n = sum(anchor[p].numel() for p in pair)
    M = torch.randn(n, n, generator=g)
    blocks.append(DenseBlock(tuple(pair), M @ M.T / n, {p: anchor[p].shape for p in pair}))
    return lalora.Precision(blocks, anchor, metadata={"backend": "test", "num_examples": 3}, prior_precision=0.25)


_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="lalora-fuzz-"))
_ORIG = _small_precision()
_ORIG_PATH = _FUZZ_DIR / "orig.lalora"
_ORIG.save(_ORIG_PATH)
_ORIG_BYTES = _ORIG_PATH.read_bytes()


def _read_parts(data: bytes):
    """(lalora header dict, tensors) of a valid file's bytes."""
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    st_header = json.loads(data[8:8 + n])
    return json.loads(st_header["__metadata__"]["lalora"]), load(data)


def _same_precision(a: lalora.Precision, b: lalora.Precision) -> bool:
    return (a.param_names == b.param_names and a.prior_precision == b.prior_precision and a.metadata == b.metadata
            and all(torch.equal(a.anchor[k], b.anchor[k]) for k in a.param_names)
            and torch.equal(a.to_dense(), b.to_dense()))


def _check_case(data: bytes, *, resealed: bool = False) -> str:
    """Load mutated bytes: must raise PrecisionFileError, or give the original precision
    (resealed=False), or give a valid finite precision (resealed=True: checksums recomputed,
    i.e. a file that says what it holds)."""
    FUZZ_CASES["count"] += 1
    path = _FUZZ_DIR / "case.lalora"
    path.write_bytes(data)
    try:
        loaded = lalora.Precision.load(path)
    except lalora.PrecisionFileError as e:
        if "invalid precision file (" in str(e):  # reached the loader's last-resort handler
            FUZZ_CASES.setdefault("fallback", []).append(str(e)[-160:])
        return "error"
    if resealed:
        dense = loaded.to_dense()
        assert bool(torch.isfinite(dense).all())
        assert all(bool(torch.isfinite(t).all()) for t in loaded.anchor.values())
        zero = {n: torch.zeros(s) for n, s in loaded.shapes.items()}
        assert float(loaded.quadratic(zero)) == 0.0
        return "loaded"
    assert _same_precision(loaded, _ORIG), "a mutated file loaded as a DIFFERENT precision"
    return "same"


def _write(header: dict, tensors: dict, *, reseal: bool) -> bytes:
    if reseal:
        header = dict(header)
        if all(isinstance(t, torch.Tensor) for t in tensors.values()):
            header["checksum"] = fileformat._checksum(tensors)
        header["header_checksum"] = fileformat._header_checksum(header)
    path = _FUZZ_DIR / "build.lalora"
    save_file(tensors, str(path), metadata={"lalora": json.dumps(header)})
    return path.read_bytes()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(obj, prefix=()):
    """Every JSON path (tuple of keys/indices) in ``obj``."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


_HEADER, _TENSORS = _read_parts(_ORIG_BYTES)
_HEADER_PATHS = [p for p in _paths(_HEADER) if p]


def _mutate(header, path, op, value):
    import copy

    h = copy.deepcopy(header)
    parent = h
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = value
    elif op == "wrap":  # valid JSON, wrong schema: the value put in a list
        parent[last] = [parent[last]]
    elif op == "stringify":
        parent[last] = json.dumps(parent[last])
    return h


@settings(settings.get_profile(FUZZ_PROFILE))
@given(st.data())
def test_fuzz_precision_loader(data):
    """Bit flips, truncations, appended bytes, header mutations (kept or recomputed checksums),
    swapped shapes and poisoned tensors: never anything but PrecisionFileError or a faithful load."""
    kind = data.draw(st.sampled_from(["bitflip", "truncate", "append", "header", "header-resealed",
                                      "swap-shapes", "tensor-resealed"]), label="kind")
    raw = bytearray(_ORIG_BYTES)
    if kind == "bitflip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=4), label="bits"):
            raw[pos // 8] ^= 1 << (pos % 8)
        _check_case(bytes(raw))
    elif kind == "truncate":
        _check_case(bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]))
    elif kind == "append":
        _check_case(bytes(raw) + data.draw(st.binary(min_size=1, max_size=64), label="tail"))
    elif kind in ("header", "header-resealed"):
        path = data.draw(st.sampled_from(_HEADER_PATHS), label="path")
        op = data.draw(st.sampled_from(["delete", "replace", "wrap", "stringify"]), label="op")
        value = data.draw(json_values, label="value") if op == "replace" else None
        header = _mutate(_HEADER, path, op, value)
        resealed = kind == "header-resealed"
        _check_case(_write(header, _TENSORS, reseal=resealed), resealed=resealed)
    elif kind == "swap-shapes":
        i, j = data.draw(st.lists(st.integers(0, len(_HEADER["params"]) - 1), min_size=2, max_size=2, unique=True))
        header = json.loads(json.dumps(_HEADER))
        a, b = header["params"][i], header["params"][j]
        a["shape"], b["shape"] = b["shape"], a["shape"]
        if a["shape"] == b["shape"]:  # same shapes: swap the tensors instead
            a["anchor"], b["anchor"] = b["anchor"], a["anchor"]
        resealed = data.draw(st.booleans(), label="reseal")
        _check_case(_write(header, _TENSORS, reseal=resealed), resealed=resealed)
    else:  # a tensor replaced by NaN/Inf/negative/other shape/other dtype, checksums recomputed
        key = data.draw(st.sampled_from(sorted(_TENSORS)), label="key")
        t = _TENSORS[key].clone()
        how = data.draw(st.sampled_from(["nan", "inf", "negative", "reshape", "int", "extra-dim", "empty", "half"]))
        if how == "nan":
            t.view(-1)[0] = float("nan")
        elif how == "inf":
            t.view(-1)[-1] = float("inf")
        elif how == "negative":
            t = -t - 1
        elif how == "reshape":
            t = t.reshape(-1)
        elif how == "int":
            t = t.to(torch.int32)
        elif how == "extra-dim":
            t = t[None]
        elif how == "empty":
            t = t.reshape(-1)[:0]
        elif how == "half":
            t = t.half()
        tensors = dict(_TENSORS, **{key: t})
        _check_case(_write(_HEADER, tensors, reseal=True), resealed=True)


def test_fuzz_report():
    """Runs after the fuzz test (file order): reports the number of cases tried."""
    fallback = FUZZ_CASES.get("fallback", [])
    print(f"\nlalora loader fuzz: {FUZZ_CASES['count']} mutated files, profile {FUZZ_PROFILE}, "
          f"{len(fallback)} caught only by the last-resort handler: {sorted(set(fallback))[:5]}")
    assert FUZZ_CASES["count"] > 0 or os.environ.get("PYTEST_XDIST_WORKER")


def test_atomic_save_exception_between_write_and_rename(tmp_path, monkeypatch):
    path = tmp_path / "p.lalora"
    _ORIG.save(path)
    before = path.read_bytes()
    other = _ORIG * 2.0

    def boom(src, dst):
        assert Path(src).exists() and Path(src).stat().st_size > 0  # the new file was fully written
        raise KeyboardInterrupt("simulated kill between write and rename")

    monkeypatch.setattr(atomic_file.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _same_precision(lalora.Precision.load(path), _ORIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.lalora"]  # no temp file left


_KILL_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
import lalora
from lalora import atomic_file
p = lalora.Precision.load({src!r})
def die(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup handler runs
atomic_file.os.replace = die
(p * 3.0).save({dst!r})
"""


def test_atomic_save_survives_sigkill(tmp_path):
    """A process SIGKILLed between write and rename: previous file intact; the orphaned temp
    file is removed by the next save to the same path."""
    path = tmp_path / "p.lalora"
    _ORIG.save(path)
    before = path.read_bytes()
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), src=str(path), dst=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert path.read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "p.lalora"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".p.lalora.") and leftovers[0].endswith(".tmp")
    (_ORIG * 0.5).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.lalora"]
    assert torch.equal(lalora.Precision.load(path).to_dense(), (_ORIG * 0.5).to_dense())


def test_newer_format_version_refused_with_upgrade_hint(tmp_path):
    header, tensors = _read_parts(_ORIG_BYTES)
    header["format_version"] = fileformat.FORMAT_VERSION + 1
    header["header_checksum"] = fileformat._header_checksum(header)
    path = tmp_path / "new.lalora"
    save_file(tensors, str(path), metadata={"lalora": json.dumps(header)})
    with pytest.raises(lalora.PrecisionFileError, match="newer than this lalora reads.*upgrade"):
        lalora.Precision.load(path)


def test_version1_file_without_header_checksum_still_loads(tmp_path):
    header, tensors = _read_parts(_ORIG_BYTES)
    header["format_version"] = 1
    del header["header_checksum"]
    path = tmp_path / "v1.lalora"
    save_file(tensors, str(path), metadata={"lalora": json.dumps(header)})
    assert _same_precision(lalora.Precision.load(path), _ORIG)
    header["format_version"] = 2  # version 2 requires the header checksum
    save_file(tensors, str(path), metadata={"lalora": json.dumps(header)})
    with pytest.raises(lalora.PrecisionFileError, match="header_checksum"):
        lalora.Precision.load(path)


def test_loading_never_unpickles(tmp_path):
    """A pickle bomb renamed to .lalora is refused without being executed."""
    import pickle

    marker = tmp_path / "pwned"

    class Bomb:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "bomb.lalora"
    path.write_bytes(pickle.dumps(Bomb()))
    torch.save({"x": torch.ones(2)}, tmp_path / "torchsave.lalora")
    for p in (path, tmp_path / "torchsave.lalora"):
        with pytest.raises(lalora.PrecisionFileError):
            lalora.Precision.load(p)
    assert not marker.exists()


# --------------------------------------------------------------------------------------
# 2. numerics
# --------------------------------------------------------------------------------------
def _mlp_batches(n=4, bs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=g), torch.randn(bs, 3, generator=g)) for _ in range(n)]


def _poison_grad_loss(out, raw):
    """MSE; on batches whose x[0, 0] == 123 adds sqrt(z^2) at z = 0: finite loss, NaN gradient."""
    loss = (out.float() - raw[1].float()).square().sum(1)
    if float(raw[0][0, 0]) == 123.0:
        z = out[:, 0] - out[:, 0].detach()
        loss = loss + torch.sqrt(z.square())
    return loss


def test_nonfinite_loss_stops_fit_naming_the_batch():
    model = lora_mlp()
    randomize_lora_B(model)
    batches = _mlp_batches()
    batches[2][1][1, 0] = float("nan")
    with pytest.raises(lalora.DataError, match=r"source batch 2 gives a non-finite loss \(examples \[1\]\).*skip_nonfinite"):
        lalora.fit_precision(model, batches, loss=_poison_grad_loss, progress=False)
    batches = _mlp_batches()
    batches[1][0][0, 0] = 123.0
    with pytest.raises(lalora.DataError, match=r"source batch 1 gives a non-finite gradient"):
        lalora.fit_precision(model, batches, loss=_poison_grad_loss, progress=False)


def test_skip_nonfinite_equals_fit_without_the_bad_batches():
    """A NaN loss (batch 1) and a NaN gradient with finite loss (batch 3) are skipped, counted,
    and the result equals a fit on the remaining batches (exact: same float64 sums)."""
    model = lora_mlp()
    randomize_lora_B(model)
    batches = _mlp_batches(5)
    batches[1][1][0, 2] = float("inf")
    batches[3][0][0, 0] = 123.0
    P = lalora.fit_precision(model, batches, loss=_poison_grad_loss, progress=False, skip_nonfinite=True)
    clean = lalora.fit_precision(model, [b for i, b in enumerate(batches) if i not in (1, 3)], loss=_poison_grad_loss,
                                 progress=False)
    assert P.metadata["skipped_nonfinite"] == 2 and P.metadata["skipped_nonfinite_batches"] == [1, 3]
    assert P.metadata["num_examples"] == clean.metadata["num_examples"] == 9
    assert P.metadata["num_batches"] == 5
    assert rel_close(P.to_dense(), clean.to_dense(), F32)  # separate fits of the same batches: round-off only
    all_bad = [(b[0], b[1] * float("nan")) for b in _mlp_batches(2)]
    with pytest.raises(lalora.DataError, match="nothing is left"):
        lalora.fit_precision(model, all_bad, loss="mse", progress=False, skip_nonfinite=True)


class _PlainBackend(lalora.CurvatureBackend):
    """A backend implementing neither skip_nonfinite nor the checkpoint protocol."""

    def fit(self, ctx):
        for _ in ctx.stream:
            pass
        return [DiagBlock(n, torch.ones(p.shape)) for n, p in ctx.params().items()]


def test_backends_without_support_refuse_skip_and_checkpoint(tmp_path):
    model = lora_mlp()
    with pytest.raises(lalora.BackendError, match="does not support skip_nonfinite"):
        lalora.fit_precision(model, _mlp_batches(), _PlainBackend(), progress=False, skip_nonfinite=True)
    with pytest.raises(lalora.BackendError, match=r"cannot be checkpointed.*state_dict\(\)/load_state_dict\(\)"):
        lalora.fit_precision(model, _mlp_batches(), _PlainBackend(), progress=False, checkpoint_dir=tmp_path)


def test_regularizer_refuses_all_zero_precision_without_prior():
    model = lora_mlp()
    anchor = {n: p.detach().float().clone() for n, p in lalora.adapters.lora_parameters(lalora.find_lora_adapters(model)).items()}
    zero = lalora.Precision([DiagBlock(n, torch.zeros(t.shape)) for n, t in anchor.items()], anchor)
    with pytest.raises(ValueError, match="zero everywhere.*prior_precision"):
        lalora.LaLoRARegularizer(model, zero, strength=1.0)
    reg = lalora.LaLoRARegularizer(model, zero, strength=2.0, prior_precision=0.5)
    with torch.no_grad():
        for p in reg._params.values():
            p.add_(0.1)
    expected = 0.5 * 2.0 * 0.5 * sum(0.01 * t.numel() for t in anchor.values())
    assert abs(float(reg().detach()) - expected) <= 1e-5 * expected


# --------------------------------------------------------------------------------------
# 3. data
# --------------------------------------------------------------------------------------
def test_empty_and_fully_masked_data_raise_clear_errors():
    model = tiny_lora_llama()
    with pytest.raises(lalora.DataError, match="data is empty"):
        lalora.fit_precision(model, [], progress=False)
    masked = token_batches(2)
    for b in masked:
        b["labels"][:] = -100
    with pytest.raises(lalora.DataError, match="every label in the 2 source batches is masked"):
        lalora.fit_precision(model, masked, progress=False)


def test_fully_masked_batch_is_skipped_and_counted():
    model = tiny_lora_llama()
    randomize_lora_B(model)
    batches = token_batches(3)
    batches[1]["labels"][:] = -100
    P = lalora.fit_precision(model, batches, progress=False)
    Q = lalora.fit_precision(model, [batches[0], batches[2]], progress=False)
    assert P.metadata["skipped_examples"] == 3 and P.metadata["num_batches"] == 3
    assert P.metadata["num_examples"] == Q.metadata["num_examples"] == 6
    assert rel_close(P.to_dense(), Q.to_dense(), F32)  # separate fits of the same batches: round-off only


def test_too_long_sequences_and_foreign_token_ids_raise():
    model = tiny_lora_llama(max_position_embeddings=8)
    with pytest.raises(lalora.DataError, match=r"source batch 1 has sequences of length 9 > .*max_position_embeddings 8"):
        lalora.fit_precision(model, token_batches(1, seq_len=7) + token_batches(1, seq_len=9), progress=False)
    bad = token_batches(2)
    bad[1]["input_ids"][0, 3] = 40  # tiny vocabulary has 37 tokens
    with pytest.raises(lalora.DataError, match=r"source batch 1 has token id 40 outside .*\[0, 37\).*another tokenizer"):
        lalora.fit_precision(model, bad, progress=False)


class _FakeTokenizer:
    def __init__(self, name, size):
        self.name_or_path, self._size = name, size

    def __len__(self):
        return self._size


def test_tokenizer_recorded_and_checked(tmp_path):
    model = tiny_lora_llama()
    with pytest.raises(lalora.DataError, match="has 50 tokens but the model embeds only 37"):
        lalora.fit_precision(model, token_batches(), progress=False, tokenizer=_FakeTokenizer("big", 50))
    P = lalora.fit_precision(model, token_batches(), progress=False, tokenizer=_FakeTokenizer("tiny-tok", 37))
    assert P.metadata["tokenizer"] == {"name": "tiny-tok", "size": 37} and P.metadata["vocab_size"] == 37
    from lalora.validation import match_to_model

    assert match_to_model(P, model, tokenizer=_FakeTokenizer("tiny-tok", 37)) is P
    with pytest.raises(lalora.ModelMismatchError, match="tokenizer 'other-tok'"):
        match_to_model(P, model, tokenizer=_FakeTokenizer("other-tok", 37))
    # resized embeddings (another tokenizer's vocabulary) are caught on load
    P.save(tmp_path / "p.lalora")
    grown = tiny_lora_llama()
    grown.base_model.model.resize_token_embeddings(45)
    with pytest.raises(lalora.ModelMismatchError, match="embeds 45 tokens.*fitted with 37"):
        lalora.Precision.load(tmp_path / "p.lalora", model=grown)


# --------------------------------------------------------------------------------------
# 4. model mismatch
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_llama(tmp_path_factory):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    P = lalora.fit_precision(model, token_batches(), progress=False)
    path = tmp_path_factory.mktemp("mismatch") / "p.lalora"
    P.save(path)
    return P, path


def test_other_rank_clear_error_and_partial_map(fitted_llama):
    P, path = fitted_llama
    other = tiny_lora_llama(r=4)
    with pytest.raises(lalora.ModelMismatchError, match=r"LoRA rank 4 in the model, 2 in the precision.*strict=False"):
        lalora.Precision.load(path, model=other)
    with pytest.warns(UserWarning, match="8 precision parameters skipped, 8 model LoRA weights unconstrained"):
        Q = lalora.Precision.load(path, model=other, strict=False)
    assert Q.param_names == [] and len(Q.metadata["skipped_params"]) == 8
    assert len(Q.metadata["mismatch_problems"]) == 8


def test_partial_precision_usable_by_the_regularizer(fitted_llama):
    P, path = fitted_llama
    more = tiny_lora_llama(targets=("q_proj", "v_proj", "o_proj"))
    randomize_lora_B(more)
    with pytest.warns(UserWarning, match="partially"):
        Q = lalora.Precision.load(path, model=more, strict=False)
    reg = lalora.LaLoRARegularizer(more, Q, strength=1.0, check_anchor=False)
    reg.reset_to_anchor()
    assert float(reg().detach()) == 0.0
    # the penalty acts on the mapped weights only, never on the unconstrained o_proj
    with torch.no_grad():
        for n, p in lalora.adapters.lora_parameters(lalora.find_lora_adapters(more)).items():
            if "o_proj" in n:
                p.add_(1.0)
    assert float(reg().detach()) == 0.0


def test_other_target_set_maps_what_matches(fitted_llama):
    P, path = fitted_llama
    more = tiny_lora_llama(targets=("q_proj", "v_proj", "o_proj"))
    randomize_lora_B(more)
    with pytest.raises(lalora.ModelMismatchError, match=r"o_proj.lora_A' is not in the precision"):
        lalora.Precision.load(path, model=more)
    with pytest.warns(UserWarning, match="0 precision parameters skipped, 4 model LoRA weights unconstrained"):
        Q = lalora.Precision.load(path, model=more, strict=False)
    assert Q.param_names == P.param_names and torch.equal(Q.to_dense(), P.to_dense())
    assert all("o_proj" in n for n in Q.metadata["unconstrained_params"])
    fewer = tiny_lora_llama(targets=("v_proj",))
    with pytest.warns(UserWarning, match="4 precision parameters skipped, 0 model LoRA weights unconstrained"):
        R = lalora.Precision.load(path, model=fewer, strict=False)
    assert all("v_proj" in n for n in R.param_names) and all("q_proj" in n for n in R.metadata["skipped_params"])
    assert torch.equal(R.diagonal()[R.param_names[0]], P.diagonal()[R.param_names[0]])


def test_other_base_model_and_adapter_selection(fitted_llama):
    P, path = fitted_llama
    with pytest.raises(lalora.ModelMismatchError, match="config hash"):
        lalora.Precision.load(path, model=tiny_lora_llama(num_hidden_layers=3))
    # two adapters selected at once: names carry the adapter; the error says which to pick
    two = tiny_lora_llama()
    from peft import LoraConfig

    two.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal"))
    with pytest.raises(lalora.ModelMismatchError, match=r"fitted on adapter\(s\) \['default'\].*\['default', 'other'\].*adapter_name"):
        lalora.Precision.load(path, model=two, adapter_name=["default", "other"])
    # picking one adapter (a rename is fine by design: canonical names leave it out)
    assert lalora.Precision.load(path, model=two, adapter_name="other").param_names == P.param_names


# --------------------------------------------------------------------------------------
# 5. checkpointed fits
# --------------------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


class _FlakyData:
    """Yields ``batches`` but raises after ``fail_after`` of them (a crash mid-fit)."""

    def __init__(self, batches, fail_after=None):
        self.batches, self.fail_after = batches, fail_after

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, b in enumerate(self.batches):
            if self.fail_after is not None and i == self.fail_after:
                raise _Interrupted(f"killed before batch {i}")
            yield b


def _count_forwards(model):
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_checkpointed_fit_resumes_to_the_uninterrupted_result(tmp_path):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    batches = token_batches(7, seed=4)
    batches[3]["labels"][:] = -100  # a skipped batch inside the consumed part
    reference = lalora.fit_precision(model, batches, progress=False)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Interrupted):
        lalora.fit_precision(model, _FlakyData(batches, fail_after=5), progress=False, checkpoint_dir=ckpt,
                             checkpoint_every=2)
    files = sorted(p.name for p in ckpt.iterdir())
    # saved after 2 consumed batches and after 5 (batch 3 has no label, so no save at 4); no temp files
    assert files == ["fit-checkpoint.safetensors"]
    calls = _count_forwards(model)
    resumed = lalora.fit_precision(model, _FlakyData(batches), progress=False, checkpoint_dir=ckpt, checkpoint_every=2)
    assert calls["n"] == 2  # batches 5 and 6 only
    assert resumed.metadata["resumed_from_batch"] == 5
    # the float64 sums are restored exactly; the batches after the resume are recomputed (round-off only)
    assert rel_close(resumed.to_dense(), reference.to_dense(), F32)
    for k in ("num_examples", "num_tokens", "num_batches", "skipped_examples", "data_fingerprint"):
        assert resumed.metadata[k] == reference.metadata[k], k
    assert list(ckpt.iterdir()) == []  # completed fits delete their checkpoint


def test_checkpoint_refuses_other_data_or_other_fit(tmp_path):
    model = tiny_lora_llama()
    randomize_lora_B(model)
    batches = token_batches(5, seed=4)
    with pytest.raises(_Interrupted):
        lalora.fit_precision(model, _FlakyData(batches, fail_after=3), progress=False, checkpoint_dir=tmp_path,
                             checkpoint_every=1)
    changed = token_batches(5, seed=5)
    with pytest.raises(lalora.DataError, match="differs from the checkpointed fit's in its first 3 batches"):
        lalora.fit_precision(model, changed, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(lalora.DataError, match="ended after 2 batches.*consumed 3"):
        lalora.fit_precision(model, batches[:2], progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    moved = tiny_lora_llama()
    randomize_lora_B(moved, seed=9)  # other theta0
    with pytest.raises(lalora.BackendError, match="written by another fit \\(anchor"):
        lalora.fit_precision(moved, batches, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        lalora.fit_precision(model, batches, progress=False, checkpoint_dir=tmp_path, checkpoint_every=0)
    (tmp_path / "fit-checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(lalora.PrecisionFileError, match="unreadable fit checkpoint"):
        lalora.fit_precision(model, batches, progress=False, checkpoint_dir=tmp_path)


def test_round_off_negative_eigenvalues_clipped_and_reported():
    from lalora.validation import clip_negative_eigenvalues

    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g)
    gram = (X @ X.T).float()  # rank 3 of 12: round-off gives tiny negative eigenvalues in float32
    gram = gram + 1e-6 * torch.diag(torch.tensor([-1.0] + [0.0] * 11))  # make sure at least one is negative
    assert float(torch.linalg.eigvalsh(gram.double()).min()) < 0
    clipped, report = clip_negative_eigenvalues(gram, "G[layer0]")
    assert report["name"] == "G[layer0]" and report["num_clipped"] >= 1 and report["min_eigenvalue"] < 0
    ev = torch.linalg.eigvalsh(clipped.double())
    assert float(ev.min()) >= -1e-6 * float(ev.max())  # float32 storage round-off only
    assert float((clipped.double() - gram.double()).abs().max()) <= 1e-5 * float(ev.max())
    assert torch.equal(clipped, clipped.T) and clipped.dtype == torch.float32
    psd = (X.T @ X).double()
    same, rep = clip_negative_eigenvalues(psd, "ok")
    assert same is psd and rep["num_clipped"] == 0
    with pytest.raises(ValueError, match=r"G\[bad\]: eigenvalue -1 is negative beyond round-off"):
        clip_negative_eigenvalues(torch.diag(torch.tensor([3.0, -1.0])), "G[bad]")

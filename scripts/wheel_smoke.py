"""Smoke test of an *installed* lalora (run by scripts/wheel_check.sh in a fresh virtual environment
that holds the wheel and its declared dependencies only, from a folder outside the checkout).

    python -I wheel_smoke.py --checkout /path/to/checkout --sdist dist/lalora-X.tar.gz --wheel dist/lalora-X.whl

Checks, each failing with the name of what is wrong:
1. ``lalora`` is imported from the environment, not from the checkout.
2. The wheel holds every file git tracks in the checkout's packages (``lalora/``, and ``backends/``
   installed as ``lalora.backends``); the sdist those and what builds the wheel and runs the tests
   (``tests/``, ``examples/``): a forgotten subpackage or data file fails here by name.
3. Every module of the installed package imports with the declared dependencies alone.
4. The built-in backends are registered through the installed entry points.
5. A tiny random-weight Llama (from a config, nothing downloaded) with orthogonal-init LoRA:
   fit ``diag`` and ``kfac`` -> save -> load with the model -> ``LaLoRARegularizer``: the penalty is
   0 at the anchor and > 0 after a LoRA weight moved.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import pkgutil
import re
import subprocess
import sys
import tarfile
import tempfile
import traceback
import zipfile
from pathlib import Path

BUILTIN_BACKENDS = {"diag", "kfac", "tri-kfac", "block", "backpack", "laplace"}


def fail(msg: str) -> None:
    print(f"wheel smoke: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def tracked_files(checkout: Path, *folders: str) -> list[str]:
    """Files git tracks under ``folders`` of the checkout (present in the work tree)."""
    out = subprocess.run(["git", "-C", str(checkout), "ls-files", "-z", "--", *folders],
                         check=True, capture_output=True, text=True).stdout
    return [rel for rel in filter(None, out.split("\0")) if (checkout / rel).is_file()]


def check_archives(checkout: Path, wheel: Path, sdist: Path) -> None:
    # installed path (lalora/...) -> checkout path, for every file of the package folders
    package = {("lalora/backends/" + rel[len("backends/"):] if rel.startswith("backends/") else rel): rel
               for rel in tracked_files(checkout, "lalora", "backends")}
    # the sdist also holds what builds the wheel and what runs the tests (MANIFEST.in)
    sdist_needs = sorted(set(package.values()) | set(tracked_files(checkout, "tests", "examples"))
                         | {"pyproject.toml", "setup.py", "README.md", "MANIFEST.in"})
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
    with tarfile.open(sdist) as t:
        # sdist members are "lalora-X.Y.Z/<path in the checkout>"
        in_sdist = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name and m.isfile()}
    missing_wheel = sorted(rel for inst, rel in package.items() if inst not in in_wheel)
    missing_sdist = [rel for rel in sdist_needs if rel not in in_sdist]
    hint = ("a package folder without __init__.py is not found by setup.py; a data file needs "
            "[tool.setuptools.package-data] in pyproject.toml; tests/ and examples/ come in through MANIFEST.in")
    if missing_sdist:
        fail(f"the sdist {sdist.name} lacks checkout files {missing_sdist} ({hint})")
    if missing_wheel:
        fail(f"the wheel {wheel.name} lacks checkout files {missing_wheel} ({hint})")
    print(f"archives: the wheel holds all {len(package)} package files of the checkout, "
          f"the sdist those and the {len(sdist_needs) - len(package)} build and test files")


def check_imports(checkout: Path) -> list[str]:
    import lalora

    where = Path(lalora.__file__).resolve()
    if checkout.resolve() in where.parents:
        fail(f"lalora was imported from the checkout ({where}), not from the installed wheel")
    errors: dict[str, str] = {}

    def onerror(name):
        errors[name] = traceback.format_exc(limit=3)

    names = [m.name for m in pkgutil.walk_packages(lalora.__path__, "lalora.", onerror=onerror)]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - every failure is reported by module name
            errors[name] = traceback.format_exc(limit=3)
    if errors:
        fail("modules that do not import with the declared dependencies only:\n"
             + "\n".join(f"--- {n}\n{tb}" for n, tb in sorted(errors.items())))
    print(f"imports: lalora {lalora.__version__} from {where.parent}; all {len(names) + 1} modules import")
    return names


def check_metadata() -> None:
    import lalora

    required = {re.match(r"[A-Za-z0-9._-]+", r).group().lower() for r in md.requires("lalora") or []
                if "extra ==" not in r}
    for dist in ("torch", "peft", "transformers", "safetensors"):
        if dist not in required:
            fail(f"pyproject.toml does not declare the runtime dependency {dist!r} (declared: {sorted(required)})")
    backends = set(lalora.list_backends())
    if not BUILTIN_BACKENDS <= backends:
        fail(f"built-in backends missing from the installed entry points: {sorted(BUILTIN_BACKENDS - backends)}")
    # curvlinops is only an extra: everything above ran without it unless a declared dependency pulls it in
    curvlinops = "installed" if importlib.util.find_spec("curvlinops") else "not installed"
    print(f"metadata: runtime dependencies {sorted(required)}; backends {sorted(backends)}; curvlinops {curvlinops}")


def tiny_lora_llama():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, attn_implementation="eager",
                      tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="orthogonal")
    return get_peft_model(base, lcfg)


def check_round_trip() -> None:
    import torch

    import lalora

    model = tiny_lora_llama()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, 37, (3, 7), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    lora_B = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("diag", "kfac"):
            precision = lalora.fit_precision(model, batches, backend=backend, progress=False)
            path = Path(tmp) / f"{backend}.lalora"
            precision.save(path)
            loaded = lalora.Precision.load(path, model=model)
            reg = lalora.LaLoRARegularizer(model, loaded, strength=1.0)
            at_anchor = float(reg().detach())
            saved = lora_B.detach().clone()
            with torch.no_grad():
                lora_B.add_(0.1)
            moved = float(reg().detach())
            with torch.no_grad():
                lora_B.copy_(saved)
            # the loaded precision is the fitted one: same quadratic form on a random displacement (the loaded
            # tensors may be laid out differently in memory: 1e-6 relative is float32 round-off)
            g = torch.Generator().manual_seed(2)
            d = {n: torch.randn(a.shape, generator=g) for n, a in precision.anchor.items()}
            q_fit, q_load = float(precision.quadratic(d)), float(loaded.quadratic(d))
            if not abs(q_fit - q_load) <= 1e-6 * abs(q_fit) or q_fit <= 0:
                fail(f"{backend}: quadratic form {q_load!r} after save -> load, {q_fit!r} before")
            # at the anchor every displacement theta - theta0 is exactly zero, so the penalty is exactly 0
            if at_anchor != 0.0:
                fail(f"{backend}: penalty {at_anchor!r} at the anchor, expected 0")
            if not moved > 0.0:
                fail(f"{backend}: penalty {moved!r} after moving {tuple(lora_B.shape)} lora_B by 0.1, expected > 0")
            print(f"round trip {backend}: fit -> save -> load -> penalty 0 at the anchor, {moved:.3g} after a move")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", type=Path, required=True, help="the source checkout (compared with, never imported)")
    ap.add_argument("--wheel", type=Path, required=True)
    ap.add_argument("--sdist", type=Path, required=True)
    args = ap.parse_args()
    check_archives(args.checkout, args.wheel, args.sdist)
    check_imports(args.checkout)
    check_metadata()
    check_round_trip()
    print("wheel smoke: OK")


if __name__ == "__main__":
    main()

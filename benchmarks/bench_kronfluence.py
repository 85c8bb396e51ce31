"""lalora's kfac fit vs kronfluence's covariance fitting (its K-FAC factors), side by side in one run.

    pip install kronfluence==1.0.1        # its last release (2024-07); installs with torch 2.14 / transformers 5.24
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/bench_kronfluence.py \
        [--config mid|smollm2] [--smol-layers 8] [--batches 4] [--batch-size 8] [--seq 128] [--repeats 3]

Same peft Llama (random weights from a config, LoRA r=8 on every linear layer of the blocks, orthogonal
init), same right-padded batches (the last quarter of each row is padding, labels -100 there), equal
masking: kronfluence gets the attention mask (``Task.get_attention_mask``) and the loss ignores -100
labels; lalora's masking is its own. kronfluence tracks the ``lora_A`` and ``lora_B`` ``nn.Linear``
modules; its ``lora_A`` activation covariance is lalora's input factor ``X`` (times the token count)
and its ``lora_B`` gradient covariance is ``s^2`` times lalora's output-gradient sum (``G`` times N).
With the empirical Fisher (true labels, no sampling) both must agree to float32 round-off: the script
checks it and prints the largest relative difference. Timed: kronfluence's covariance pass
(``fit_covariance_matrices_with_loader``, its compute without the disk writes of ``Analyzer``) and
``lalora.fit_precision(backend="kfac")``, empirical and MC, and one forward+backward pass for scale;
peak RSS above the start of each call. Medians of interleaved repeats.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_all import LLM_CONFIGS, PeakRSS, mib  # noqa: E402
from bench_diag import build, fwd_bwd, timed  # noqa: E402

import lalora  # noqa: E402


def padded_batches(vocab, n, bs, seq):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (bs, seq), generator=g)
        mask = torch.ones(bs, seq, dtype=torch.long)
        mask[:, seq - seq // 4:] = 0  # right padding
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def kronfluence_task(module_names):
    from kronfluence.task import Task

    class LMTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits, labels = logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
            if sample:
                with torch.no_grad():
                    draw = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
                labels = torch.where(labels == -100, labels, draw)
            return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return module_names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return LMTask()


def kronfluence_fit(model, data, empirical: bool):
    """kronfluence's covariance pass on a prepared copy of ``model``; returns (counts, factors)."""
    from kronfluence.analyzer import prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.factor.covariance import fit_covariance_matrices_with_loader
    from kronfluence.utils.state import State

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and (".lora_A." in n or ".lora_B." in n)]
    task = kronfluence_task(names)
    prepared = prepare_model(copy.deepcopy(model), task)
    args = FactorArguments(strategy="kfac", use_empirical_fisher=empirical, covariance_max_examples=None)
    loader = torch.utils.data.DataLoader(data, batch_size=None)  # the batches as they are
    return fit_covariance_matrices_with_loader(prepared, State(cpu=True), task, loader, args, disable_tqdm=True)


def compare_factors(model, P, factors):
    """Largest relative difference of kronfluence's factors and lalora's X, s^2 N G (empirical Fisher)."""
    acov, gcov = factors["activation_covariance"], factors["gradient_covariance"]
    a_n = factors["num_activation_covariance_processed"]
    N = P.metadata["num_examples"]
    worst = 0.0
    for a in lalora.find_lora_adapters(model):
        blk = next(b for b in P.blocks if b.params[0] == a.a_name)
        kA = next(k for k in acov if k.endswith(f"{a.module_path}.lora_A.{a.adapter_name}"))
        kB = next(k for k in gcov if k.endswith(f"{a.module_path}.lora_B.{a.adapter_name}"))
        X = acov[kA].double() / float(a_n[kA])
        G = gcov[kB].double() / (a.scaling ** 2 * N)
        for mine, theirs in ((blk.X.dense(), X), (blk.G.dense(), G)):
            worst = max(worst, float((mine.double() - theirs).norm() / theirs.norm()))
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mid", choices=["mid", "smollm2"])
    ap.add_argument("--smol-layers", type=int, default=8)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    try:
        import kronfluence
    except ImportError as e:
        print(f"kronfluence is not installed ({e}): pip install kronfluence==1.0.1")
        return 1
    cfg = dict(LLM_CONFIGS[a.config])
    if a.config == "smollm2":
        cfg["num_hidden_layers"] = a.smol_layers
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(" :\t") if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {cpu}, {os.cpu_count()} cpus, load {os.getloadavg()}, jemalloc "
          f"{'yes' if 'jemalloc' in os.environ.get('LD_PRELOAD', '') else 'no'}")
    print(f"# torch {torch.__version__} ({torch.get_num_threads()} threads), kronfluence {kronfluence.__version__}, "
          f"lalora {lalora.__version__}; config {a.config}, {a.batches} batches x {a.batch_size} x {a.seq} "
          f"(right-padded, 1/4 padding)")
    model = build(cfg)
    data = padded_batches(cfg["vocab_size"], a.batches, a.batch_size, a.seq)
    model.eval()
    fwd_bwd(model, data[:1])
    runs = {
        "fwd+bwd": lambda: fwd_bwd(model, data),
        "lalora kfac empirical": lambda: lalora.fit_precision(model, data, "kfac", progress=False, options={"curvature": lalora.Curvature.EF}),
        "kronfluence kfac empirical": lambda: kronfluence_fit(model, data, True),
        "lalora kfac mc": lambda: lalora.fit_precision(model, data, "kfac", progress=False, options={"curvature": lalora.Curvature.MC}),
        "kronfluence kfac mc": lambda: kronfluence_fit(model, data, False),
    }
    times = {k: [] for k in runs}
    peaks = {}
    for _ in range(a.repeats):
        for k, f in runs.items():
            times[k].append(timed(f))
    for k, f in runs.items():
        with PeakRSS() as m:
            f()
        peaks[k] = m.peak
    P = lalora.fit_precision(model, data, "kfac", progress=False, options={"curvature": lalora.Curvature.EF})
    _, factors = kronfluence_fit(model, data, True)
    err = compare_factors(model, P, factors)
    fb = statistics.median(times["fwd+bwd"])
    for k in runs:
        t = statistics.median(times[k])
        print(f"{k:>28}: {t:7.2f} s ({t / fb:.2f}x fwd+bwd), peak RSS {mib(peaks[k])}")
    for kind in ("empirical", "mc"):
        ratio = statistics.median(times[f"kronfluence kfac {kind}"]) / statistics.median(times[f"lalora kfac {kind}"])
        print(f"kronfluence / lalora time ({kind}): {ratio:.2f}x")
    print(f"factors, empirical Fisher: largest relative difference lalora vs kronfluence {err:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

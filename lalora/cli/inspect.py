"""``lalora inspect``: a precision file's metadata, blocks and the spectrum of its diagonal."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import PrecisionFileError
from .common import EXIT_OK, UsageError, add_command
from .vocab import to_cli


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "inspect", run, fmt, "lalora inspect precision.lalora\nlalora inspect precision.lalora --json",
                    help="show a precision file's metadata, blocks and spectrum")
    p.add_argument("path", help="precision file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def spectrum_summary(precision) -> dict:
    """Quantiles of the diagonal of the precision over all LoRA weights, and its zero fraction."""
    import torch

    d = torch.cat([v.reshape(-1).double() for v in precision.diagonal().values()])
    q = torch.quantile(d[:: max(1, d.numel() // 1_000_000)], torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return {"min": q[0].item(), "p10": q[1].item(), "median": q[2].item(), "p90": q[3].item(), "max": q[4].item(),
            "mean": d.mean().item(), "zero_fraction": (d == 0).double().mean().item(), "count": d.numel()}


def run(args) -> int:
    from ..precision import Precision

    p = Path(args.path)
    if not p.is_file():
        raise UsageError(f"{args.path}: no such file")
    try:
        precision = Precision.load(p)
    except (PrecisionFileError, ValueError, OSError) as e:
        raise UsageError(f"{args.path}: not a readable lalora precision file ({to_cli(e)})") from None
    spec = spectrum_summary(precision)
    blocks = [{"kind": b.kind, "params": list(b.params), "bytes": b.num_bytes, "describe": b.describe()} for b in precision.blocks]
    if args.json:
        print(json.dumps({"metadata": precision.metadata, "structure": precision.structure, "num_params": precision.num_params,
                          "num_bytes": precision.num_bytes, "prior_precision": precision.prior_precision, "blocks": blocks,
                          "diagonal_summary": spec, "zero_params": precision.zero_params()}, indent=1, default=str))
        return EXIT_OK
    print(f"file: {p} ({p.stat().st_size / 2**20:.2f} MiB)")
    print(precision.summary())
    print("diagonal spectrum: " + "  ".join(f"{k}={v:.3g}" for k, v in spec.items() if k != "count")
          + f"  (over {spec['count']:,} weights)")
    print("metadata:")
    for k, v in precision.metadata.items():
        s = json.dumps(v, default=str) if not isinstance(v, str) else v
        print(f"  {k}: {s if len(s) < 160 else s[:157] + '...'}")
    return EXIT_OK

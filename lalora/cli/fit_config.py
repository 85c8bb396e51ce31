"""``lalora fit --dry-run --config CONFIG``: per-rank peak memory and stored bytes from a model config alone
(no weights, no data, nothing downloaded or written; ``lalora.estimate_memory``)."""
from __future__ import annotations

from .common import EXIT_OK, UsageError

_TRUE = ("1", "true", "yes", "on")


def add_config_flags(p) -> None:
    g = p.add_argument_group("dry run from a model config (with --dry-run; no --model, --data or --out)")
    g.add_argument("--config", metavar="CONFIG",
                   help="a config.json, a directory holding one, or a preset (llama-3.1-8b, llama-3.1-70b): estimate "
                        "from the shapes alone; --batch-size x --max-length tokens per batch per rank, --dtype the "
                        "model's dtype; --option max_memory=SIZE (factor sums of one pass) and shard_factors=true "
                        "are modelled as well")
    g.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the fit (default 1; > 1: model "
                                                             "weights fully sharded)")


def check_config_mode(args) -> bool:
    """True for a dry run from a config (its flags checked here); else the flags a real fit needs are checked."""
    if args.config is None:
        # --data / --source-from-model: fit_source.check_source_flags
        missing = [f for f, v in (("--model", args.model), ("--out", args.out)) if v is None]
        if missing:
            raise UsageError(f"the following arguments are required: {', '.join(missing)} "
                             "(or --dry-run --config CONFIG for an estimate from a model config alone)")
        return False
    if args.dry_run is None:
        raise UsageError("--config needs --dry-run (it estimates from shapes; a fit needs --model and --data)")
    given = [f for f, v in (("--model", args.model), ("--data", args.data), ("--adapter", args.adapter)) if v]
    if given:
        raise UsageError(f"--config: the dry run from a model config takes no {', '.join(given)}")
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    return True


def run_config_dry_run(args) -> int:
    from ..errors import BackendError
    from ..estimate_memory import estimate_from_config
    from .inputs import parse_options
    from .vocab import to_cli

    options = {k: (str(v).lower() in _TRUE if k == "shard_factors" else v) for k, v in parse_options(args.option).items()}
    try:
        est = estimate_from_config(args.config, args.backend, targets=args.targets or "all-linear", rank=args.rank or 8,
                                   alpha=args.alpha, options=options, world_size=args.world_size,
                                   batch_size=args.batch_size, seq_len=args.max_length, dtype=args.dtype)
    except BackendError as e:
        raise UsageError(f"--backend {args.backend}: {to_cli(e)}") from None
    except ValueError as e:
        raise UsageError(f"--config {args.config}: {e}") from None
    print(est.format())
    return EXIT_OK

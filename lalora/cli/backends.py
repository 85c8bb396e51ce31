"""``lalora backends``: the registered curvature backends, their curvature, typed options and whether they load here."""
from __future__ import annotations

import json

from ..backend_info import describe_backends, format_backends
from ..errors import BackendError
from .common import EXIT_OK, UsageError, add_command


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "backends", run, fmt, "lalora backends\nlalora backends kfac\nlalora backends --json",
                    help="list curvature backends, their curvature, options (type, default, doc) and availability")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these backends (default: all)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    try:
        rows = describe_backends(args.names)
    except BackendError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(rows, indent=1, default=str) if args.json else format_backends(rows))
    return EXIT_OK

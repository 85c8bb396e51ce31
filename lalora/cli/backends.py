"""``lalora backends``: the registered curvature backends, their options and whether they load here."""
from __future__ import annotations

import json

from ..backend import get_backend, list_backends
from ..errors import BackendError
from .common import EXIT_OK, add_command


def add_parser(sub, fmt) -> None:
    p = add_command(sub, "backends", run, fmt, "lalora backends\nlalora backends --json",
                    help="list curvature backends, their options and availability")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def rows() -> list[dict]:
    """One row per registered backend: name, available, status, curvature, options, option_help."""
    out = []
    for name in list_backends():
        try:
            cls = get_backend(name)
        except BackendError as e:
            out.append({"name": name, "available": False, "status": str(e), "curvature": None, "options": {}})
            continue
        ok, status = cls.available()
        out.append({"name": name, "available": ok, "status": status, "curvature": cls.curvature,
                    "options": dict(cls.default_options), "option_help": dict(getattr(cls, "option_help", {}))})
    return out


def run(args) -> int:
    table = rows()
    if args.json:
        print(json.dumps(table, indent=1, default=str))
        return EXIT_OK
    for r in table:
        mark = "yes" if r["available"] else "no "
        print(f"{r['name']:<10} available={mark} curvature={r['curvature'] or '-'}"
              + ("" if r["available"] else f"  ({r['status']})"))
        for k, v in r["options"].items():
            h = r.get("option_help", {}).get(k, "")
            print(f"    {k}={v!r}" + (f"  {h}" if h else ""))
    return EXIT_OK

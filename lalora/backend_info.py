"""What ``lalora backends`` shows: each backend's availability, curvature and declared options."""
from __future__ import annotations

from .backend import get_backend, list_backends
from .errors import BackendError
from .options import curvature_name


def describe_backend(name: str) -> dict:
    """``name``'s row: ``available``, ``status``, ``curvature`` (the default), ``curvatures`` (all it can
    estimate), ``options`` (name -> default), ``option_help`` (name -> doc) and ``option_details`` (one
    entry per option: name, type, default, doc, choices, renamed_from; from its ``Options`` declaration)."""
    try:
        cls = get_backend(name)
    except BackendError as e:
        return {"name": name, "available": False, "status": str(e), "curvature": None, "curvatures": [],
                "options": {}, "option_help": {}, "option_details": []}
    ok, status = cls.available()
    details = cls.Options.describe()
    return {"name": name, "available": ok, "status": status, "curvature": curvature_name(cls.curvature),
            "curvatures": list(cls.curvatures()), "options_class": cls.Options.__name__,
            "options": {d["name"]: d["default"] for d in details},
            "option_help": {d["name"]: d["doc"] for d in details}, "option_details": details}


def describe_backends(names=None) -> list[dict]:
    """Rows of ``names`` (default: every registered backend and entry point); an unknown name raises
    ``BackendError`` with the list of available ones."""
    known = list_backends()
    for n in names or ():
        if n not in known:
            get_backend(n)  # raises, naming the available backends
    return [describe_backend(n) for n in (names or known)]


def format_backends(rows: list[dict]) -> str:
    """The text of ``lalora backends``: per backend one line, then one line per option."""
    lines = []
    for r in rows:
        mark = "yes" if r["available"] else "no "
        many = len(r["curvatures"]) > 1
        kinds = [f"{c} (default)" if many and c == r["curvature"] else str(c) for c in r["curvatures"]] or \
            [r["curvature"] or "undeclared"]
        lines.append(f"{r['name']:<10} available={mark} curvature={', '.join(kinds)}"
                     + ("" if r["available"] else f"  ({r['status']})"))
        for d in r["option_details"]:
            was = f"  [lalora 0.1: {', '.join(d['renamed_from'])}]" if d["renamed_from"] else ""
            lines.append(f"    {d['name']}: {d['type']} = {d['default']!r}" + (f"  {d['doc']}" if d["doc"] else "") + was)
    return "\n".join(lines)

"""``CompareResult``: the rows of a comparison and their terminal table, JSON and Markdown forms."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

_ROW_COLUMNS = [  # (key, header, format)
    ("name", "method", "{}"), ("curvature", "curvature", "{}"), ("seconds", "time s", "{:.2f}"),
    ("peak_memory_bytes", "peak MiB", "mib"), ("num_bytes", "stored MiB", "mib"), ("file_bytes", "file MiB", "mib"),
    ("rel_err_random_mean", "err rand", "{:.3g}"), ("rel_err_eigen_mean", "err eig", "{:.3g}"),
    ("rel_err_displacement", "err disp", "{:.3g}"), ("frobenius_all", "frob", "{:.3g}"),
    ("cosine_all", "cos top1", "{:.3f}"),
]


def _fmt(value, spec) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if spec == "mib":
        return f"{value / 2**20:.3f}"
    return spec.format(value)


def _cells(row: dict) -> list[str]:
    """A row's table cells; a failed/unavailable row shows its status in the curvature column."""
    if row.get("status", "ok") == "ok":
        return [_fmt(row.get(k), f) for k, _, f in _ROW_COLUMNS]
    return [row["name"], row.get("status", "?")] + ["-"] * (len(_ROW_COLUMNS) - 2)


def _clean(obj):
    """JSON-safe copy: non-finite floats -> None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class CompareResult:
    """Rows (one dict per method, see ``docs/compare.md`` for the keys), the reference's summary
    (``None`` without a reference), the block names and the settings used."""

    rows: list[dict]
    reference: dict | None = None
    blocks: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def row(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {[r['name'] for r in self.rows]}")

    def to_dict(self) -> dict:
        return _clean({"rows": self.rows, "reference": self.reference, "blocks": self.blocks, "settings": self.settings})

    def to_json(self, path=None, indent: int = 1) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "CompareResult":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        d = json.loads(text)
        return cls(rows=d["rows"], reference=d.get("reference"), blocks=d.get("blocks", []), settings=d.get("settings", {}))

    def _header_lines(self) -> list[str]:
        ref = self.reference
        if ref is None:
            why = self.settings.get("reference_note") or "no reference"
            return [f"reference: none ({why})"]
        mem = _fmt(ref.get("peak_memory_bytes"), "mib")
        return [f"reference: exact dense {ref['kind']} over {ref['num_params']} LoRA weights "
                f"({ref.get('seconds') if ref.get('seconds') is not None else '-'} s, peak {mem} MiB); "
                f"errors are relative: |d'Pd - d'Rd| / d'Rd over {self.settings.get('num_random')} random directions "
                f"(mean), the top {self.settings.get('top_k')} eigenvectors of R (mean), the displacement; "
                f"frob = |P - R|_F / |R|_F; cos = |cos| between top eigenvectors"]

    def _notes(self) -> list[str]:
        out = [f"{r['name']}: {r['status']}: {r.get('error', '')}" for r in self.rows if r.get("status", "ok") != "ok"]
        return out + [f"{r['name']}: {n}" for r in self.rows for n in r.get("notes", [])]

    def table(self) -> str:
        """Fixed-width table for the terminal."""
        heads = [h for _, h, _ in _ROW_COLUMNS]
        body = [_cells(r) for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        out = self._header_lines() + [line(heads), line(["-" * w for w in widths])] + [line(b) for b in body]
        methods = {r.get("memory_method") for r in self.rows if r.get("memory_method")}
        if methods:
            out.append(f"peak memory: {', '.join(sorted(methods))}")
        return "\n".join(out + self._notes())

    def to_markdown(self) -> str:
        """Markdown: the main table, then per-block Frobenius errors and top-eigenvector cosines."""
        heads = [h for _, h, _ in _ROW_COLUMNS]
        lines = [f"_{self._header_lines()[0]}_", "", "| " + " | ".join(heads) + " |",
                 "|" + "|".join(["---"] * 2 + ["---:"] * (len(heads) - 2)) + "|"]
        lines += ["| " + " | ".join(_cells(r)) + " |" for r in self.rows]
        methods = {r.get("memory_method") for r in self.rows if r.get("memory_method")}
        if methods:
            lines += ["", f"Peak memory measured as: {', '.join(sorted(methods))}."]
        ok_rows = [r for r in self.rows if r.get("status", "ok") == "ok" and r.get("frobenius")]
        for key, title in (("frobenius", "Relative Frobenius error per block"), ("cosine", "|cos| between top eigenvectors per block")):
            if not ok_rows:
                break
            lines += ["", f"**{title}**", "", "| block | " + " | ".join(r["name"] for r in ok_rows) + " |",
                      "|---|" + "|".join(["---:"] * len(ok_rows)) + "|"]
            for b in self.blocks + ["all"]:
                lines.append(f"| {b} | " + " | ".join(_fmt(r[key].get(b), "{:.3g}") for r in ok_rows) + " |")
        notes = self._notes()
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.table()

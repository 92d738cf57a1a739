"""Plain-text tables for the terminal."""

from __future__ import annotations


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Numbers right-aligned, text left-aligned."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def iteration_table(summary: dict) -> str:
    rows = [
        [r["iteration"], r["sparsity"], r["total_sparsity"], r["heads_left"], r["channels_left"],
         r["sub_models"], r.get("cv_kendall_tau"), r["model_params"]]
        for r in summary["iterations"]
    ]
    head = ["iteration", "sparsity", "of all params", "heads left", "channels left", "sub-models",
            "CV tau", "parameters"]
    return table(head, rows) + f"\n\npruned model: {summary['model']}"

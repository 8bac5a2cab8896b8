"""Plain-text tables and number formats for the commands that print summaries (cache ls/inspect, report)."""


def format_table(header: list[str], rows: list[list], indent: str = "", left: int = 1) -> str:
    """Columns padded to their widest cell: the first `left` columns (names) left-aligned, the rest
    (numbers) right-aligned. None shows as '-'."""
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join(line(row) for row in cells)


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def number(value, digits: int = 4) -> str:
    """Signed-free fixed-point for metrics; '-' for a missing value, the text of nan/inf as is."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"

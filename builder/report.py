"""The mixture report of a dataset build: what each source gave, lost and weighs in the mixture.

`tunefile stats RECIPE` reads the dataset stage's `stats.json` and calls these:

    stats = json.loads((dataset_dir / "stats.json").read_text())
    print(format_stats_table(stats, color=True))        # one row per source and a total row
    write_mixture_png(stats, Path("mixture.png"))      # shares of examples/tokens, length histogram

Older stats.json files lack some keys (rows, malformed, deduplicated, filtered, mean_tokens,
max_tokens, length_histogram, order): their cells show "-" and the histogram panel is left out.
Output is deterministic: the same stats give the same text and the same PNG bytes.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

BOLD, DIM, RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"
TOP_REASONS = 3
MISSING = "-"
# (header, right-aligned); the order of the cells in _source_cells and _total_cells
COLUMNS = (("source", False), ("rows", True), ("rejected", True), ("top reasons", False),
           ("dedup", True), ("filtered", True), ("usable", True), ("eval", True), ("sampled", True),
           ("% examples", True), ("tokens", True), ("trained", True), ("% trained", True),
           ("mean/max tok", True))
FIGURE_WIDTH, PANEL_HEIGHT, DPI = 8.0, 3.0, 100


def ordered_sources(stats: dict) -> list[str]:
    """Source names in recipe order: stats["order"] when present, else the dict's order."""
    sources = stats.get("sources", {})
    names = [name for name in stats.get("order", []) if name in sources]
    return names + [name for name in sources if name not in names]


def sorted_reasons(rejected: dict[str, int]) -> list[tuple[str, int]]:
    """Reject reasons, most common first, ties by name; reasons with no rejects left out."""
    return sorted(((r, n) for r, n in rejected.items() if n), key=lambda item: (-item[1], item[0]))


def format_stats_table(stats: dict, color: bool = False) -> str:
    """The mixture table (a row per source, then the total) and every reject reason per source."""
    names = ordered_sources(stats)
    sources = [stats["sources"][name] for name in names]
    rows = [_source_cells(name, s, sources) for name, s in zip(names, sources)]
    total = _total_cells(sources)
    table = [[header for header, _ in COLUMNS]] + rows + [total]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) if right else cell.ljust(w)
                         for cell, w, (_, right) in zip(cells, widths, COLUMNS)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [_paint(line(table[0]), BOLD, color), rule]
    lines += [_paint(line(cells), DIM, color and not s.get("sampled")) for cells, s in zip(rows, sources)]
    lines += [rule, _paint(line(total), BOLD, color)]

    reasons = [(name, sorted_reasons(s.get("rejected", {}))) for name, s in zip(names, sources)]
    if any(found for _, found in reasons):
        lines += ["", "rejects by reason:"]
        lines += [f"  {name}: {_format_reasons(found)}" for name, found in reasons if found]
    return "\n".join(lines) + "\n"


def _source_cells(name: str, s: dict, sources: list[dict]) -> list[str]:
    rejected = s.get("rejected", {})
    sampled = s.get("sampled", 0)
    mean_max = MISSING
    if sampled and "mean_tokens" in s and "max_tokens" in s:
        mean_max = f"{s['mean_tokens']:.1f}/{s['max_tokens']:,}"
    return [name, _count(s.get("rows")), _count(sum(rejected.values())),
            _format_reasons(sorted_reasons(rejected)[:TOP_REASONS]) or MISSING,
            _count(s.get("deduplicated")), _count(s.get("filtered")), _count(s.get("usable")),
            _count(s.get("eval")), _count(sampled),
            _share(sampled, sum(x.get("sampled", 0) for x in sources)),
            _count(s.get("tokens")), _count(s.get("trained_tokens")),
            _share(s.get("trained_tokens", 0), sum(x.get("trained_tokens", 0) for x in sources)),
            mean_max]


def _total_cells(sources: list[dict]) -> list[str]:
    rejected: dict[str, int] = {}
    for s in sources:
        for reason, n in s.get("rejected", {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
    sampled = _total(sources, "sampled")
    trained = _total(sources, "trained_tokens")
    mean_max = MISSING
    if sampled and all("mean_tokens" in s and "max_tokens" in s for s in sources):
        # the mean over all train examples: each source's mean weighted by its examples
        mean = sum(s["mean_tokens"] * s.get("sampled", 0) for s in sources) / sampled
        mean_max = f"{mean:.1f}/{max(s['max_tokens'] for s in sources if s.get('sampled')):,}"
    return ["total", _count(_total(sources, "rows")), _count(sum(rejected.values())),
            _format_reasons(sorted_reasons(rejected)[:TOP_REASONS]) or MISSING,
            _count(_total(sources, "deduplicated")), _count(_total(sources, "filtered")),
            _count(_total(sources, "usable")), _count(_total(sources, "eval")), _count(sampled),
            _share(sampled, sampled), _count(_total(sources, "tokens")),
            _count(trained), _share(trained or 0, trained or 0),
            mean_max]


def _total(sources: list[dict], key: str) -> int | None:
    """The sum over sources, or None when a source lacks the key (an old stats.json)."""
    if not all(key in s for s in sources):
        return None
    return sum(s[key] for s in sources)


def _count(n: int | None) -> str:
    return MISSING if n is None else f"{n:,}"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else MISSING


def _format_reasons(reasons: list[tuple[str, int]]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in reasons)


def _paint(text: str, code: str, on: bool) -> str:
    return f"{code}{text}{RESET}" if on else text


def write_mixture_png(stats: dict, path: Path) -> None:
    """A PNG of each source's share of examples and of trained tokens, and the length histogram
    stacked by source (left out when stats has none). Same stats, same bytes; written atomically."""
    import matplotlib
    from matplotlib import style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = ordered_sources(stats)
    sources = [stats["sources"][name] for name in names]
    histogram = stats.get("length_histogram")
    # the default style, so that a user's matplotlibrc cannot change the bytes
    with style.context("default"):
        figure = Figure(figsize=(FIGURE_WIDTH, PANEL_HEIGHT * (2 if histogram else 1)), dpi=DPI)
        FigureCanvasAgg(figure)
        colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(names))]
        axes = figure.subplots(2 if histogram else 1, 1, squeeze=False)[:, 0]
        _plot_shares(axes[0], names, sources, colors)
        if histogram:
            _plot_histogram(axes[1], names, histogram, colors)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    _write_atomically(Path(path), buffer.getvalue())


def _plot_shares(ax, names: list[str], sources: list[dict], colors: list) -> None:  # noqa: ANN001
    bars = ("examples", "trained tokens")
    keys = ("sampled", "trained_tokens")
    totals = [sum(s.get(key, 0) for s in sources) for key in keys]
    left = [0.0, 0.0]
    for name, s, color in zip(names, sources, colors):
        shares = [100 * s.get(key, 0) / total if total else 0.0 for key, total in zip(keys, totals)]
        drawn = ax.barh(bars, shares, left=left, color=color, label=name)
        # a label only where the segment is wide enough to hold it
        ax.bar_label(drawn, labels=[f"{x:.0f}%" if x >= 6 else "" for x in shares], label_type="center",
                     color="white", fontsize="small")
        left = [a + b for a, b in zip(left, shares)]
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.set_xlabel("share of the train mixture (%)")
    ax.set_title("mixture by source")
    if names:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)


def _plot_histogram(ax, names: list[str], histogram: dict, colors: list) -> None:  # noqa: ANN001
    edges = histogram["edges"]
    # bins as categories: the edges grow geometrically, so equal widths read better
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]
    positions = list(range(len(labels)))
    bottom = [0] * len(labels)
    for name, color in zip(names, colors):
        counts = histogram.get("counts", {}).get(name)
        if counts:
            ax.bar(positions, counts, bottom=bottom, color=color, label=name)
            bottom = [a + b for a, b in zip(bottom, counts)]
    ax.set_xticks(positions, labels)
    ax.set_xlabel("tokens per train example")
    ax.set_ylabel("examples")
    ax.set_title("length histogram")


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the report is for everyone who reads the build
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_quant_table(train: dict | None, evals: dict[str, dict]) -> str:
    """`tunefile report`: the training summary and one row per GGUF file measured by an eval stage
    (size, perplexity on assistant tokens and its ratio to the first row, generation speed, and
    whether the template survived the round trip), in the order given (unquantized first)."""
    lines = []
    if train:
        lines.append(f"train: {train.get('steps')} steps, train loss {train.get('train_loss')}, eval loss "
                     f"{train.get('eval_loss')}, {train.get('tokens_per_second')} tokens/s on {train.get('device')} "
                     f"({train.get('precision', '-')}), padding {_percent(train.get('padding_fraction'))}")
    header = ("gguf", "MiB", "perplexity", "vs first", "gen tok/s", "template")
    rows = []
    first = next((m.get("perplexity") for m in evals.values() if m.get("perplexity")), None)
    for name, metrics in evals.items():
        ppl = metrics.get("perplexity")
        checks = {**metrics.get("template_roundtrip", {}), **metrics.get("template_checks", {})}
        rows.append((name, f"{metrics.get('file_bytes', 0) / 2**20:.2f}", MISSING if ppl is None else f"{ppl:.4f}",
                     MISSING if not (ppl and first) else f"{ppl / first:.4f}x",
                     str(metrics.get("generation_tokens_per_second", MISSING)),
                     "ok" if checks and all(checks.values()) else
                     "FAILED: " + ", ".join(k for k, v in sorted(checks.items()) if not v) if checks else MISSING))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"

"""The mixture report of a dataset build: what each source gave, lost and weighs in the mixture.

`tunefile stats RECIPE` reads the dataset stage's `stats.json` and calls these:

    stats = read_json(dataset_dir / "stats.json")
    print(format_stats_table(stats, color=True))        # one row per source and a total row
    write_mixture_png(stats, Path("mixture.png"))      # shares of examples/tokens, length histogram

Each dropped row is counted in one column: `rejected` (malformed rows and the template's refusals,
with their top reasons), `dedup` (duplicate, near_duplicate) or `filtered` (quality filters,
too_long, decontaminated); "rejects by reason" below the table lists every reason of all three.
Older stats.json files lack some keys (rows, malformed, deduplicated, filtered, mean_tokens,
max_tokens, length_histogram, order): their cells show "-" and the histogram panel is left out.
Output is deterministic: the same stats give the same text and the same PNG bytes. The eval
summary's plot (builder/evaluate/summary.py) draws its panels with the same draw_frame and draw_bars.
"""
from __future__ import annotations

import io
from pathlib import Path

from builder.files import write_atomic
from builder.recipe.schema import FiltersSpec

BOLD, DIM, RESET = "\x1b[1m", "\x1b[2m", "\x1b[0m"
TOP_REASONS = 3
MISSING = "-"
# (header, right-aligned); the order of the cells in _source_cells and _total_cells
COLUMNS = (("source", False), ("rows", True), ("rejected", True), ("top reasons", False),
           ("dedup", True), ("filtered", True), ("usable", True), ("eval", True), ("sampled", True),
           ("% examples", True), ("tokens", True), ("trained", True), ("% trained", True),
           ("mean/max tok", True))
FIGURE_WIDTH, PANEL_HEIGHT, DPI = 8.0, 3.0, 100
# Reject reasons that are deliberate drops: they never count toward a source's reject rate
# (mixture.max_reject_rate). Every filter rejects with its own recipe key name as the reason.
DEDUPLICATED = {"duplicate", "near_duplicate"}
DELIBERATE = {*DEDUPLICATED, "decontaminated", "too_long", *FiltersSpec.model_fields}
HISTOGRAM_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def source_stats(rows, kept: list[int], rejects: list, eval_rows: set[int], pool: list[int],
                 picked: list[int]) -> dict:
    """One source's line of stats.json: what it gave, lost, and weighs in the mixture."""
    from collections import Counter

    tokens, trained = rows.tokens[picked], rows.trained[picked]
    reasons = Counter(r.reason for r in rejects)
    return {"rows": rows.rows_read, "conversations": rows.conversations,
            "malformed": sum(r.reason not in DELIBERATE for r in rows.rejects), "usable": len(kept),
            "rejected": dict(sorted(reasons.items())), "eval": len(eval_rows),
            "deduplicated": sum(n for r, n in reasons.items() if r in DEDUPLICATED),
            "filtered": sum(n for r, n in reasons.items() if r in DELIBERATE - DEDUPLICATED),
            "train_pool": len(pool), "sampled": len(picked), "tokens": int(tokens.sum()),
            "trained_tokens": int(trained.sum()),
            "mean_tokens": round(float(tokens.sum()) / len(tokens), 1) if len(tokens) else 0.0,
            "max_tokens": int(tokens.max(initial=0))}


def length_histogram(lengths: dict) -> dict:
    """Token lengths of the train examples per source (arrays), in fixed bins (the report's histogram)."""
    import numpy as np

    longest = max([int(np.max(n, initial=0)) for n in lengths.values()] + [1])
    edges = [e for e in HISTOGRAM_EDGES if e < longest] + [next((e for e in HISTOGRAM_EDGES if e >= longest), longest)]
    counts = {s: np.histogram(n, bins=edges)[0].astype(int).tolist() for s, n in lengths.items()}
    return {"edges": edges, "counts": counts}


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


def _not_deliberate(rejected: dict[str, int]) -> dict[str, int]:
    """The reasons of the `rejected` column: deliberate drops have their own columns (dedup, filtered)."""
    return {reason: n for reason, n in rejected.items() if reason not in DELIBERATE}


def _source_cells(name: str, s: dict, sources: list[dict]) -> list[str]:
    rejected = _not_deliberate(s.get("rejected", {}))
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
    rejected = _not_deliberate(rejected)
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


# tab10's colours, by source in recipe order
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
PANEL_PX = int(PANEL_HEIGHT * DPI)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 110, 150, 28, 40


def write_mixture_png(stats: dict, path: Path) -> None:
    """A PNG (drawn with Pillow: a tenth of matplotlib's start-up) of each source's share of
    examples and of trained tokens; the length histogram stacked by source; and the mean length
    along the training order (flat for a shuffle, rising for a curriculum). Panels whose numbers
    stats lacks are left out. Same stats, same bytes; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    names = ordered_sources(stats)
    sources = [stats["sources"][name] for name in names]
    panels = [_draw_shares]
    if stats.get("length_histogram"):
        panels.append(_draw_histogram)
    if stats.get("length_by_position"):
        panels.append(_draw_positions)
    width = int(FIGURE_WIDTH * DPI)
    image = Image.new("RGB", (width, PANEL_PX * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    for k, panel in enumerate(panels):
        box = (MARGIN_LEFT, k * PANEL_PX + MARGIN_TOP, width - MARGIN_RIGHT, (k + 1) * PANEL_PX - MARGIN_BOTTOM)
        panel(draw, font, box, names, sources, colors, stats)
    for i, (name, color) in enumerate(zip(names, colors)):  # one legend, right of the first panel
        x, y = width - MARGIN_RIGHT + 12, MARGIN_TOP + 18 * i
        draw.rectangle((x, y + 2, x + 12, y + 12), fill=color)
        draw.text((x + 18, y), name, fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    write_atomic(Path(path), buffer.getvalue())


def draw_frame(draw, font, box: tuple, title: str, xlabel: str) -> None:
    """A panel's box, its title above and its x-axis label below (shared with the eval plot)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text(((left + right) // 2, top - 6), title, fill="black", font=font, anchor="mb")
    draw.text(((left + right) // 2, bottom + 22), xlabel, fill="black", font=font, anchor="mt")


def draw_bars(draw, font, box: tuple, columns: list[list[tuple[float, tuple]]], labels: list[str], top_value: float,
              ylabel: str) -> None:
    """Vertical stacked bars: columns[j] is a list of (value, colour) from the bottom up (shared with
    the eval plot)."""
    left, top, right, bottom = box
    slot = (right - left) / max(len(columns), 1)
    for j, stack in enumerate(columns):
        base = bottom
        for value, color in stack:
            height = (bottom - top) * value / top_value if top_value else 0
            if height > 0:
                x0, x1 = left + j * slot + slot * 0.15, left + (j + 1) * slot - slot * 0.15
                draw.rectangle((x0, base - height, x1, base), fill=color)
            base -= height
        draw.text((left + (j + 0.5) * slot, bottom + 4), labels[j], fill="black", font=font, anchor="mt")
    draw.text((left - 8, top), f"{top_value:,.0f}", fill="black", font=font, anchor="ra")
    draw.text((left - 8, bottom), "0", fill="black", font=font, anchor="rb")
    draw.text((left - 8, (top + bottom) // 2), ylabel, fill="black", font=font, anchor="rm")


def _draw_shares(draw, font, box, names, sources, colors, stats) -> None:
    left, top, right, bottom = box
    draw_frame(draw, font, box, "mixture by source", "share of the train mixture (%)")
    rows = (("examples", "sampled"), ("trained tokens", "trained_tokens"))
    height = (bottom - top) / len(rows)
    for r, (label, key) in enumerate(rows):
        total = sum(s.get(key, 0) for s in sources)
        x, y0, y1 = float(left), top + r * height + height * 0.2, top + (r + 1) * height - height * 0.2
        for s, color in zip(sources, colors):
            share = 100 * s.get(key, 0) / total if total else 0.0
            x1 = x + (right - left) * share / 100
            if x1 > x:
                draw.rectangle((x, y0, x1, y1), fill=color)
            if share >= 6:  # a label only where the segment is wide enough to hold it
                draw.text(((x + x1) / 2, (y0 + y1) / 2), f"{share:.0f}%", fill="white", font=font, anchor="mm")
            x = x1
        draw.text((left - 8, (y0 + y1) / 2), label, fill="black", font=font, anchor="rm")


def _draw_histogram(draw, font, box, names, sources, colors, stats) -> None:
    histogram = stats["length_histogram"]
    edges = histogram["edges"]
    labels = [f"{lo}-{hi}" for lo, hi in zip(edges, edges[1:])]  # bins as categories: edges grow geometrically
    counts = histogram.get("counts", {})
    columns = [[(counts[name][j], color) for name, color in zip(names, colors) if counts.get(name)]
               for j in range(len(labels))]
    peak = max([sum(v for v, _ in column) for column in columns] + [1])
    draw_frame(draw, font, box, "length histogram", "tokens per train example")
    draw_bars(draw, font, box, columns, labels, peak, "examples")


def _draw_positions(draw, font, box, names, sources, colors, stats) -> None:
    means = stats["length_by_position"]
    order = stats.get("mixture_order", "shuffle")
    columns = [[(m, (90, 90, 90))] for m in means]
    labels = [f"{100 * (j + 1) // len(means)}%" if j % max(1, len(means) // 5) == 0 or j == len(means) - 1 else ""
              for j in range(len(means))]
    draw_frame(draw, font, box, f"mean tokens along the training order ({order})", "position in the train split")
    draw_bars(draw, font, box, columns, labels, max(means + [1]), "tokens")

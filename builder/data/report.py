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


def eval_panels(metrics: dict[str, dict]) -> list[tuple[str, dict[str, float]]]:
    """(title, {type: value}) for each number eval/metrics.json holds for every type: perplexity,
    the stop rate, the instruction-following rates and each task metric."""
    def value(m: dict, path: tuple) -> float | None:
        for key in path:
            m = m.get(key) if isinstance(m, dict) else None
        return m if isinstance(m, (int, float)) and not isinstance(m, bool) else None

    paths = [("perplexity (assistant tokens)", ("perplexity",)), ("stop rate", ("checks", "stop_rate")),
             ("instructions followed, strict (prompts)", ("checks", "prompt_strict")),
             ("constraints met, strict", ("checks", "constraint_strict"))]
    tasks = sorted({t for m in metrics.values() for t in (m.get("tasks") or {})})
    paths += [(f"{t}: {k}", ("tasks", t, k)) for t in tasks for k in ("acc", "acc_norm", "exact_match")]
    panels = []
    for title, path in paths:
        values = {name: value(m, path) for name, m in metrics.items()}
        if values and all(v is not None for v in values.values()):
            panels.append((title, values))
    return panels


def write_eval_png(metrics: dict[str, dict], path: Path) -> None:
    """eval/metrics.png: one panel per metric, a bar per GGUF file (the base model first, in grey),
    for `dvc plots show`. Same metrics, same bytes."""
    from PIL import Image, ImageDraw, ImageFont

    panels = eval_panels(metrics) or [("no metrics yet", {})]
    width = int(FIGURE_WIDTH * DPI)
    image = Image.new("RGB", (width, PANEL_PX * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)
    for k, (title, values) in enumerate(panels):
        box = (MARGIN_LEFT, k * PANEL_PX + MARGIN_TOP, width - MARGIN_RIGHT, (k + 1) * PANEL_PX - MARGIN_BOTTOM)
        _frame(draw, font, box, title, "GGUF file")
        names = list(values)
        columns = [[(values[n], (150, 150, 150) if n == "base" else PALETTE[i % len(PALETTE)])] for i, n in enumerate(names)]
        top = max([*values.values(), 1e-9]) * 1.1 if values and max(values.values()) > 1 else 1.0
        _bars(draw, font, box, columns, names, top, "")
        for j, n in enumerate(names):  # the value above each bar
            slot = (box[2] - box[0]) / len(names)
            height = (box[3] - box[1]) * values[n] / top
            draw.text((box[0] + (j + 0.5) * slot, box[3] - height - 3), f"{values[n]:.3g}", fill="black", font=font,
                      anchor="mb")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    write_atomic(Path(path), buffer.getvalue())


def _frame(draw, font, box: tuple, title: str, xlabel: str) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text(((left + right) // 2, top - 6), title, fill="black", font=font, anchor="mb")
    draw.text(((left + right) // 2, bottom + 22), xlabel, fill="black", font=font, anchor="mt")


def _bars(draw, font, box: tuple, columns: list[list[tuple[float, tuple]]], labels: list[str], top_value: float,
          ylabel: str) -> None:
    """Vertical stacked bars: columns[j] is a list of (value, colour) from the bottom up."""
    left, top, right, bottom = box
    slot = (right - left) / max(len(columns), 1)
    for j, stack in enumerate(columns):
        base = bottom
        for value, color in stack:
            height = (bottom - top) * value / top_value if top_value else 0
            if height > 0:
                draw.rectangle((left + j * slot + slot * 0.15, base - height, left + (j + 1) * slot - slot * 0.15, base),
                               fill=color)
            base -= height
        draw.text((left + (j + 0.5) * slot, bottom + 4), labels[j], fill="black", font=font, anchor="mt")
    draw.text((left - 8, top), f"{top_value:,.0f}", fill="black", font=font, anchor="ra")
    draw.text((left - 8, bottom), "0", fill="black", font=font, anchor="rb")
    draw.text((left - 8, (top + bottom) // 2), ylabel, fill="black", font=font, anchor="rm")


def _draw_shares(draw, font, box, names, sources, colors, stats) -> None:
    left, top, right, bottom = box
    _frame(draw, font, box, "mixture by source", "share of the train mixture (%)")
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
    _frame(draw, font, box, "length histogram", "tokens per train example")
    _bars(draw, font, box, columns, labels, peak, "examples")


def _draw_positions(draw, font, box, names, sources, colors, stats) -> None:
    means = stats["length_by_position"]
    order = stats.get("mixture_order", "shuffle")
    columns = [[(m, (90, 90, 90))] for m in means]
    labels = [f"{100 * (j + 1) // len(means)}%" if j % max(1, len(means) // 5) == 0 or j == len(means) - 1 else ""
              for j in range(len(means))]
    _frame(draw, font, box, f"mean tokens along the training order ({order})", "position in the train split")
    _bars(draw, font, box, columns, labels, max(means + [1]), "tokens")


def format_quant_table(train: dict | None, evals: dict[str, dict]) -> str:
    """`tunefile report`: the training summary and one row per GGUF file measured by an eval stage
    (size, perplexity on assistant tokens, its ratio to the base model's and to the first tuned
    row, generation speed, and whether the template survived the round trip), in the order given
    (the base model first, then the unquantized file)."""
    lines = []
    if train:
        lines.append(f"train: {train.get('steps')} steps, train loss {train.get('train_loss')}, eval loss "
                     f"{train.get('eval_loss')}, {train.get('tokens_per_second')} tokens/s on {train.get('device')} "
                     f"({train.get('precision', '-')}), padding {_percent(train.get('padding_fraction'))}")
    tasks = sorted({t for m in evals.values() for t in (m.get("tasks") or {})})
    judged = any(m.get("judge") for m in evals.values())
    header = ("gguf", "MiB", "perplexity", "vs base", "vs first", "stop rate", "IF strict", *(f"{t} acc" for t in tasks),
              *(("judge win vs base",) if judged else ()), "gen tok/s", "template")
    rows = []
    first = next((m.get("perplexity") for n, m in evals.items() if n != "base" and m.get("perplexity")), None)
    for name, metrics in evals.items():
        ppl = metrics.get("perplexity")
        checks = {**(metrics.get("template_roundtrip") or {}), **(metrics.get("template_checks") or {})}
        versus = metrics.get("vs_base") or {}
        vs_base = versus.get("perplexity_ratio")
        instructions = metrics.get("checks") or {}
        scores = [_with_delta(((metrics.get("tasks") or {}).get(t) or {}).get("acc"),
                              ((versus.get("tasks") or {}).get(t) or {}).get("acc_delta")) for t in tasks]
        rows.append((name, f"{metrics.get('file_bytes', 0) / 2**20:.2f}", MISSING if ppl is None else f"{ppl:.4f}",
                     MISSING if vs_base is None else f"{vs_base:.4f}x",
                     MISSING if not (ppl and first) or name == "base" else f"{ppl / first:.4f}x",
                     _with_delta(instructions.get("stop_rate"), versus.get("stop_rate_delta")),
                     _with_delta(instructions.get("prompt_strict"), versus.get("prompt_strict_delta")), *scores,
                     *((_win(metrics.get("judge")),) if judged else ()),
                     str(metrics.get("generation_tokens_per_second", MISSING)),
                     "ok" if checks and all(checks.values()) else
                     "FAILED: " + ", ".join(k for k, v in sorted(checks.items()) if not v) if checks else MISSING))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines) + "\n"


def _win(judge: dict | None) -> str:
    """0.625 [0.500, 0.750]: the judge's win rate of the tuned answers and its 95% interval."""
    if not judge or judge.get("win_rate") is None:
        return MISSING
    low, high = judge["win_rate_ci95"]
    return f"{judge['win_rate']:.3f} [{low:.3f}, {high:.3f}]"


def _with_delta(value: float | None, delta: float | None) -> str:
    """0.600 (+0.267): a tuned file's number and its change from the base model's."""
    if value is None:
        return MISSING
    return f"{value:.3f}" + ("" if delta is None else f" ({delta:+.3f})")


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"

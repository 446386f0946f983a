"""The eval summary of a recipe: every eval stage's metrics by type, each tuned file against the
base model, as eval/metrics.json (`dvc metrics`), eval/metrics.png (`dvc plots`) and the
`tunefile report` table.

    metrics = write_eval_summary(build / "eval", {"base": build / "eval/base", "f16": ...}, build / "preference")
    print(format_quant_table(read_metrics(build / "train"), metrics))

Same metrics, same bytes: the JSON has sorted keys, the PNG is drawn with Pillow and no clock.
"""
from __future__ import annotations

import io
from pathlib import Path

from builder.data.report import (
    DPI,
    FIGURE_WIDTH,
    MARGIN_BOTTOM,
    MARGIN_LEFT,
    MARGIN_RIGHT,
    MARGIN_TOP,
    MISSING,
    PALETTE,
    PANEL_PX,
    draw_bars,
    draw_frame,
)
from builder.files import read_json, write_atomic, write_json

BASE_GREY = (150, 150, 150)  # the base model's bars; tuned files take the palette's colours
CHECK_DELTAS = ("stop_rate", "eos_stop_rate", "prompt_strict", "prompt_loose", "constraint_strict", "constraint_loose",
                "answer_tokens_mean")


def read_metrics(folder: Path) -> dict:
    """A stage folder's metrics.json; {} when the stage has written none."""
    return read_json(folder / "metrics.json", default={})


def eval_metrics(evals: dict[str, Path], preference: Path | None = None) -> dict[str, dict]:
    """Every eval's metrics by type (`evals`: type -> its stage folder); each tuned file's with
    `vs_base`: its numbers against the base model's, measured on the same items by the same code.
    Perplexity as a ratio and a delta (< 1, < 0: tuning helped); the instruction checks, the stop
    rate and every task metric as base and delta. With preference tuning (`preference`: its stage
    folder), each tuned file also gets `preference`: the held-out pairs' accuracy and margin of the
    SFT model and of the model after DPO (what the preference stage measured)."""
    metrics = {name: read_metrics(folder) for name, folder in evals.items()}
    held_out = (read_metrics(preference).get("held_out") or {}) if preference is not None else {}
    base = metrics.get("base") or {}
    out = {}
    for name, m in metrics.items():
        if name != "base" and base:
            out[name] = {**m, "vs_base": versus_base(m, base)}
        else:
            out[name] = m
        if name != "base" and held_out:
            out[name] = {**out[name], "preference": held_out}
    return out


def versus_base(tuned: dict, base: dict) -> dict:
    """A tuned file's numbers against the base model's: ratios, deltas and the base's values."""
    versus: dict = {}
    if base.get("perplexity") and tuned.get("perplexity"):
        versus.update({"perplexity_base": base["perplexity"],
                       "perplexity_delta": round(tuned["perplexity"] - base["perplexity"], 4),
                       "perplexity_ratio": round(tuned["perplexity"] / base["perplexity"], 4)})
    checks, base_checks = tuned.get("checks") or {}, base.get("checks") or {}
    for key in CHECK_DELTAS:
        if isinstance(checks.get(key), (int, float)) and isinstance(base_checks.get(key), (int, float)):
            versus[f"{key}_base"] = base_checks[key]
            versus[f"{key}_delta"] = round(checks[key] - base_checks[key], 4)
    tasks = {}
    for task, scores in (tuned.get("tasks") or {}).items():
        before = (base.get("tasks") or {}).get(task) or {}
        tasks[task] = {f"{k}_delta": round(v - before[k], 6) for k, v in scores.items()
                       if k != "samples" and isinstance(before.get(k), (int, float))}
        tasks[task].update({f"{k}_base": before[k] for k in scores if k != "samples" and k in before})
    if tasks:
        versus["tasks"] = tasks
    return versus


def write_eval_summary(folder: Path, evals: dict[str, Path], preference: Path | None = None) -> dict[str, dict]:
    """eval/metrics.json and eval/metrics.png in `folder` from the eval stages' folders; the metrics."""
    metrics = eval_metrics(evals, preference)
    write_json(folder / "metrics.json", metrics)
    write_eval_png(metrics, folder / "metrics.png")
    return metrics


def eval_panels(metrics: dict[str, dict]) -> list[tuple[str, dict[str, float]]]:
    """(title, {type: value}) for each number eval/metrics.json holds for every type: perplexity,
    the stop rate (at the end-of-turn marker) and the EOS stop rate, the instruction-following
    rates and each task metric."""
    def value(m: dict, path: tuple) -> float | None:
        for key in path:
            m = m.get(key) if isinstance(m, dict) else None
        return m if isinstance(m, (int, float)) and not isinstance(m, bool) else None

    paths = [("perplexity (assistant tokens)", ("perplexity",)), ("stop rate", ("checks", "stop_rate")),
             ("stops at EOS, not at the end of turn", ("checks", "eos_stop_rate")),
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
        draw_frame(draw, font, box, title, "GGUF file")
        names = list(values)
        columns = [[(values[n], BASE_GREY if n == "base" else PALETTE[i % len(PALETTE)])] for i, n in enumerate(names)]
        top = max([*values.values(), 1e-9]) * 1.1 if values and max(values.values()) > 1 else 1.0
        draw_bars(draw, font, box, columns, names, top, "")
        for j, n in enumerate(names):  # the value above each bar
            slot = (box[2] - box[0]) / len(names)
            height = (box[3] - box[1]) * values[n] / top
            draw.text((box[0] + (j + 0.5) * slot, box[3] - height - 3), f"{values[n]:.3g}", fill="black", font=font,
                      anchor="mb")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    write_atomic(Path(path), buffer.getvalue())


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
    header = ("gguf", "MiB", "perplexity", "vs base", "vs first", "stop rate", "EOS stops", "IF strict",
              *(f"{t} acc" for t in tasks), *(("judge win vs base",) if judged else ()), "gen tok/s", "template")
    first = next((m.get("perplexity") for n, m in evals.items() if n != "base" and m.get("perplexity")), None)
    rows = [_quant_row(name, metrics, tasks, judged, first) for name, metrics in evals.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        lines.append("  ".join(c.ljust(w) if i in (0, len(header) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return "\n".join(lines) + "\n"


def _quant_row(name: str, metrics: dict, tasks: list[str], judged: bool, first: float | None) -> tuple[str, ...]:
    """One GGUF file's cells; `first` is the first tuned file's perplexity (the `vs first` column)."""
    ppl = metrics.get("perplexity")
    checks = {**(metrics.get("template_roundtrip") or {}), **(metrics.get("template_checks") or {})}
    versus = metrics.get("vs_base") or {}
    vs_base = versus.get("perplexity_ratio")
    instructions = metrics.get("checks") or {}
    scores = [_with_delta(((metrics.get("tasks") or {}).get(t) or {}).get("acc"),
                          ((versus.get("tasks") or {}).get(t) or {}).get("acc_delta")) for t in tasks]
    return (name, f"{metrics.get('file_bytes', 0) / 2**20:.2f}", MISSING if ppl is None else f"{ppl:.4f}",
            MISSING if vs_base is None else f"{vs_base:.4f}x",
            MISSING if not (ppl and first) or name == "base" else f"{ppl / first:.4f}x",
            _with_delta(instructions.get("stop_rate"), versus.get("stop_rate_delta")),
            _with_delta(instructions.get("eos_stop_rate"), versus.get("eos_stop_rate_delta")),
            _with_delta(instructions.get("prompt_strict"), versus.get("prompt_strict_delta")), *scores,
            *((_win(metrics.get("judge")),) if judged else ()),
            str(metrics.get("generation_tokens_per_second", MISSING)),
            "ok" if checks and all(checks.values()) else
            "FAILED: " + ", ".join(k for k, v in sorted(checks.items()) if not v) if checks else MISSING)


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

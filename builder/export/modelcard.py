"""The model card (README.md) written beside the GGUF: what was built, from what, and how.

Only deterministic facts go in (keys, recipe settings, data counts, losses), so rebuilding the
same inputs gives the same card.
"""
from __future__ import annotations

import yaml

from builder import __version__
from builder.files import read_json

LINEAGE_STAGES = ("base", "dataset", "pairs", "train", "preference", "merge", "gguf")


def _preference_lines(recipe, stage_dir) -> list[str]:
    """The preference stage's held-out numbers (nothing for a recipe without one: same card bytes)."""
    if recipe.preference is None:
        return []
    held = read_json(stage_dir("preference") / "metrics.json", default={}).get("held_out") or {}
    return ["", f"Preference tuning ({recipe.preference.method}): held-out preference accuracy "
                f"{held.get('accuracy_sft')} (SFT) -> {held.get('accuracy')} over {held.get('pairs')} pairs."]


def render_model_card(recipe, keys: dict[str, str], stage_dir, gguf_file: str) -> str:
    """Markdown for the GGUF folder; `keys` maps stage names to keys, `stage_dir(name)` gives an
    upstream stage's folder."""
    stats = read_json(stage_dir("dataset") / "stats.json", default={})
    metrics = read_json(stage_dir("train") / "metrics.json", default={})
    rows = [f"| {name} | {s.get('sampled', 0)} | {s.get('trained_tokens', 0)} | {sum(s.get('rejected', {}).values())} |"
            for name, s in sorted(stats.get("sources", {}).items())]
    settings = yaml.safe_dump({"train": recipe.slice("train")["train"], "mixture": recipe.slice("mixture")["mixture"]},
                              sort_keys=True, default_flow_style=False)
    return "\n".join([
        f"# {recipe.name}",
        "",
        f"`{gguf_file}` was built by tunefile {__version__} from recipe `{recipe.name}`: base model "
        f"`{recipe.base.model}`, chat template `{recipe.template}`, fine-tuned with {recipe.train.method}"
        + (f", then preference-tuned with {recipe.preference.method} (beta {recipe.preference.beta})."
           if recipe.preference is not None else "."),
        "",
        "## Lineage",
        "",
        "| stage | key |",
        "|---|---|",
        *[f"| {name} | `{keys[name]}` |" for name in LINEAGE_STAGES if name in keys],
        "",
        "## Data",
        "",
        "| source | examples | trained tokens | rejected rows |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Eval examples: {stats.get('eval_examples', 0)}.",
        "",
        "## Training",
        "",
        "```yaml",
        settings.rstrip(),
        "```",
        "",
        f"Final train loss {metrics.get('train_loss')}, eval loss {metrics.get('eval_loss')} "
        f"over {metrics.get('steps')} steps.",
        *_preference_lines(recipe, stage_dir),
        "",
        "## Use",
        "",
        "The GGUF carries the training chat template (`tokenizer.chat_template`); llama.cpp and",
        "llama-cpp-python apply it to chat requests.",
        "",
    ])

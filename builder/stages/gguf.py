"""gguf stage: llama.cpp's converter (same version as the quantizer) turns the merged model into
`model-<dtype>.gguf`, with the chat template and tunefile's lineage keys in its metadata."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from builder import __version__
from builder.errors import StageError
from builder.export.modelcard import render_model_card
from builder.export.vendor import ensure_converter
from builder.stages import StageContext

# tunefile's builtin tokenizers are byte-level BPEs with GPT-2's split; the converter only knows
# tokenizers of published models by fingerprint, so it is told which pre-tokenizer to use.
BUILTIN_PRE_TOKENIZER = "gpt-2"


def lineage_metadata(ctx: StageContext) -> dict[str, str]:
    # The no_end_of_turn policy is written only off its default (absent means append_eos), so files
    # built before the key existed keep their bytes; the Modelfile and eval read it from here.
    policy = {"tunefile.no_end_of_turn": ctx.recipe.no_end_of_turn} if ctx.recipe.no_end_of_turn != "append_eos" else {}
    return {
        **policy,
        "tunefile.version": __version__,
        "tunefile.recipe": ctx.recipe.name,
        "tunefile.base_model": ctx.recipe.base.model,
        "tunefile.base_key": ctx.plan["base"].key,
        "tunefile.dataset_key": ctx.plan["dataset"].key,
        "tunefile.train_key": ctx.plan["train"].key,
        # Written only with preference tuning, so files of recipes without it keep their bytes.
        **({"tunefile.pairs_key": ctx.plan["pairs"].key, "tunefile.preference_key": ctx.plan["preference"].key}
           if "preference" in ctx.plan else {}),
        "tunefile.gguf_key": ctx.stage.key,
    }


def gguf_name(dtype: str) -> str:
    return f"model-{dtype}.gguf"


def convert_model(recipe, model_dir: Path, out: Path, dtype: str, name: str, metadata: dict) -> None:
    """llama.cpp's converter on an HF folder, with tunefile's lineage keys (and the builtin
    tokenizers' pre-tokenizer) added; `out` is written or StageError says why not."""
    converter = ensure_converter()
    lineage = {"metadata": metadata,
               "pre_tokenizer": BUILTIN_PRE_TOKENIZER if recipe.base.ref.builtin is not None else None}
    lineage_file = out.with_name(f".{out.name}.lineage.json")  # read by the converter, removed after
    lineage_file.write_text(json.dumps(lineage, sort_keys=True))
    cmd = [sys.executable, "-m", "builder.export.convert", str(converter), str(lineage_file), "--",
           str(model_dir), "--outfile", str(out), "--outtype", dtype, "--model-name", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        lineage_file.unlink(missing_ok=True)
    if done.returncode != 0 or not out.is_file():
        raise StageError(f"llama.cpp's converter failed on {model_dir}:\n{done.stderr[-3000:]}")


def run(ctx: StageContext) -> dict:
    dtype = ctx.recipe.export.gguf.dtype
    out = ctx.out_dir / gguf_name(dtype)
    convert_model(ctx.recipe, ctx.input_dir("merge"), out, dtype, ctx.recipe.name, lineage_metadata(ctx))
    card = render_model_card(ctx.recipe, ctx.plan, ctx.input_dir, out.name)
    (ctx.out_dir / "README.md").write_text(card, encoding="utf-8")
    return {"file": out.name, "bytes": out.stat().st_size}

"""HF -> GGUF: llama.cpp's convert_hf_to_gguf.py, run in a subprocess with two additions.

    convert_model(recipe, merge_dir, out_dir / gguf_name("f16"), "f16", recipe.name, lineage_metadata(recipe, keys))

runs this module as

    python -m builder.export.convert CONVERTER_DIR LINEAGE_JSON -- <converter arguments>

1. A tokenizer the converter does not recognise (any locally trained BPE: it fingerprints
   known models) gets the pre-tokenizer named in LINEAGE_JSON["pre_tokenizer"] instead of an
   error; tunefile's builtin tokenizers split exactly like llama.cpp's `gpt-2` one.
2. Every string in LINEAGE_JSON["metadata"] is written as a GGUF key (lineage: recipe, keys).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builder import __version__
from builder.errors import StageError
from builder.export.vendor import ensure_converter
from builder.files import read_json, write_json

# tunefile's builtin tokenizers are byte-level BPEs with GPT-2's split; the converter only knows
# tokenizers of published models by fingerprint, so it is told which pre-tokenizer to use.
BUILTIN_PRE_TOKENIZER = "gpt-2"


def gguf_name(dtype: str) -> str:
    """The file name of a GGUF of that type (`f16`, `q8_0`): `model-<dtype>.gguf`."""
    return f"model-{dtype}.gguf"


def lineage_metadata(recipe, keys: dict[str, str]) -> dict[str, str]:
    """The tunefile.* GGUF keys of a tuned file: the recipe and the key of every stage it came from
    (`keys`: stage name -> key, the gguf stage's included)."""
    # The no_end_of_turn policy is written only off its default (absent means append_eos), so files
    # built before the key existed keep their bytes; the Modelfile and eval read it from here.
    policy = {"tunefile.no_end_of_turn": recipe.no_end_of_turn} if recipe.no_end_of_turn != "append_eos" else {}
    return {
        **policy,
        "tunefile.version": __version__,
        "tunefile.recipe": recipe.name,
        "tunefile.base_model": recipe.base.model,
        "tunefile.base_key": keys["base"],
        "tunefile.dataset_key": keys["dataset"],
        "tunefile.train_key": keys["train"],
        # Written only with preference tuning, so files of recipes without it keep their bytes.
        **({"tunefile.pairs_key": keys["pairs"], "tunefile.preference_key": keys["preference"]}
           if "preference" in keys else {}),
        "tunefile.gguf_key": keys["gguf"],
    }


def convert_model(recipe, model_dir: Path, out: Path, dtype: str, name: str, metadata: dict) -> None:
    """llama.cpp's converter on an HF folder, with tunefile's lineage keys (and the builtin
    tokenizers' pre-tokenizer) added; `out` is written or StageError says why not."""
    converter = ensure_converter()
    lineage = {"metadata": metadata,
               "pre_tokenizer": BUILTIN_PRE_TOKENIZER if recipe.base.ref.builtin is not None else None}
    lineage_file = out.with_name(f".{out.name}.lineage.json")  # read by the converter, removed after
    write_json(lineage_file, lineage)
    cmd = [sys.executable, "-m", "builder.export.convert", str(converter), str(lineage_file), "--",
           str(model_dir), "--outfile", str(out), "--outtype", dtype, "--model-name", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        lineage_file.unlink(missing_ok=True)
    if done.returncode != 0 or not out.is_file():
        raise StageError(f"llama.cpp's converter failed on {model_dir}:\n{done.stderr[-3000:]}")


def main() -> None:
    converter, lineage_file, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: convert CONVERTER_DIR LINEAGE_JSON -- ARGS"
    lineage = read_json(Path(lineage_file))
    # The vendored gguf-py must win over any installed gguf: it matches the converter.
    sys.path[:0] = [str(Path(converter) / "gguf-py"), converter]
    from conversion.base import TextModel

    recognise = TextModel.get_vocab_base_pre
    fallback = lineage.get("pre_tokenizer")

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognise(self, tokenizer)
        except NotImplementedError:
            if not fallback:
                raise
            return fallback

    set_parameters = TextModel.set_gguf_parameters

    def set_gguf_parameters(self) -> None:
        set_parameters(self)
        for key, value in sorted(lineage.get("metadata", {}).items()):
            self.gguf_writer.add_string(key, value)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    TextModel.set_gguf_parameters = set_gguf_parameters
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

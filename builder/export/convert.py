"""HF -> GGUF: llama.cpp's convert_hf_to_gguf.py, run in a subprocess with three additions.

    convert_model(recipe, merge_dir, out_dir / gguf_name("f16"), "f16", recipe.name, lineage_metadata(recipe, keys))

runs this module as

    python -m builder.export.convert CONVERTER_DIR LINEAGE_JSON -- <converter arguments>

1. A tokenizer the converter does not recognise (any locally trained BPE: it fingerprints
   known models) gets the pre-tokenizer named in LINEAGE_JSON["pre_tokenizer"] instead of an
   error; tunefile's builtin tokenizers split exactly like llama.cpp's `gpt-2` one.
2. Every string in LINEAGE_JSON["metadata"] is written as a GGUF key (lineage: recipe, keys).
3. LINEAGE_JSON["eot_token_id"], the token that closes an answer in the folder's chat template
   (`<|im_end|>` for ChatML), is written as `tokenizer.ggml.eot_token_id`, so llama.cpp stops
   there because the file says so, not because it guessed the token from its name.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builder import __version__
from builder.errors import StageError
from builder.export.vendor import ensure_converter
from builder.files import read_json, write_json
from builder.templates import end_of_turn_markers, saved_chat_template, special_tokens

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


def added_token_ids(model_dir: Path) -> dict[str, int]:
    """The added (special) tokens of the tokenizer.json in `model_dir`, text -> id; {} without one."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        return {}
    return {t["content"]: t["id"] for t in read_json(tokenizer_file).get("added_tokens", [])}


def end_of_turn_ids(model_dir: Path) -> list[int]:
    """The ids of the tokens that close an answer in the chat template saved in `model_dir`: the
    one after the final answer first, then the one after earlier answers where it differs
    (`[4]` for ChatML's `<|im_end|>` in the builtin tokenizer; EOS's id for a template that closes
    answers with EOS). [] without a template, for a template with no end-of-turn token (its
    answers end at EOS, or at the next turn's opener), or for a marker that is not one added token."""
    template = saved_chat_template(model_dir)
    if not template:
        return []
    specials = special_tokens(model_dir)
    markers = end_of_turn_markers(template, bos_token=specials.get("bos_token"), eos_token=specials.get("eos_token"))
    if not markers.has_token:
        return []
    ids = added_token_ids(model_dir)
    return [ids[text] for text in dict.fromkeys([markers.final.strip(), markers.middle.strip()]) if text in ids]


def convert_model(recipe, model_dir: Path, out: Path, dtype: str, name: str, metadata: dict) -> None:
    """llama.cpp's converter on an HF folder, with tunefile's lineage keys, the chat template's
    end-of-turn token id (and the builtin tokenizers' pre-tokenizer) added; `out` is written or
    StageError says why not."""
    converter = ensure_converter()
    # EOS is an end-of-generation token already; the end-of-turn key names the one that is not.
    eos = added_token_ids(model_dir).get(special_tokens(model_dir).get("eos_token", ""))
    eot = next((i for i in end_of_turn_ids(model_dir) if i != eos), None)
    lineage = {"metadata": metadata, "eot_token_id": eot,
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
    from gguf.vocab import SpecialVocab

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

    add_to_gguf = SpecialVocab.add_to_gguf
    eot = lineage.get("eot_token_id")

    def add_special_tokens(self, writer, quiet: bool = False) -> None:
        if eot is not None:  # written with the other special token ids, in their order
            self.special_token_ids["eot"] = eot
        add_to_gguf(self, writer, quiet)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    TextModel.set_gguf_parameters = set_gguf_parameters
    SpecialVocab.add_to_gguf = add_special_tokens
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()

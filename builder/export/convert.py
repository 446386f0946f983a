"""Run llama.cpp's convert_hf_to_gguf.py with two additions; used by the gguf stage as

    python -m builder.export.convert CONVERTER_DIR LINEAGE_JSON -- <converter arguments>

1. A tokenizer the converter does not recognise (any locally trained BPE: it fingerprints
   known models) gets the pre-tokenizer named in LINEAGE_JSON["pre_tokenizer"] instead of an
   error; tunefile's builtin tokenizers split exactly like llama.cpp's `gpt-2` one.
2. Every string in LINEAGE_JSON["metadata"] is written as a GGUF key (lineage: recipe, keys).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    converter, lineage_file, sep, *args = sys.argv[1:]
    assert sep == "--", "usage: convert CONVERTER_DIR LINEAGE_JSON -- ARGS"
    lineage = json.loads(Path(lineage_file).read_text())
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

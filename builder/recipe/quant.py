"""The llama.cpp quantization types tunefile accepts, by recipe name.

A static table (checked against the installed llama_cpp in tests) so that `tunefile validate`
can reject `q4_k_z` without loading llama.cpp.
"""
from __future__ import annotations

# recipe name -> llama_ftype value (llama.h `enum llama_ftype`); all of these work without an
# importance matrix. The i-quants that need one (iq1_*, iq2_*, q2_k_s) are left out until
# recipes can name an imatrix file.
QUANT_TYPES: dict[str, int] = {
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
}

# What the converter can write directly (`convert_hf_to_gguf.py --outtype`).
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")


def quant_ftype_name(quant: str) -> str:
    """The llama_cpp constant for a recipe quant name: q4_k_m -> LLAMA_FTYPE_MOSTLY_Q4_K_M."""
    return "LLAMA_FTYPE_MOSTLY_" + quant.upper()

"""`tunefile doctor`: does the installed llama-cpp-python run our files on this CPU?

Setup ends with it (the Makefile), so a llama.cpp build that crashes here stops setup with a
message instead of segfaulting in the middle of `dvc repro`. It writes a tiny random Llama GGUF
with gguf-py (sizes that are multiples of 256, as K-quants need), quantizes it to q8_0 and
q4_k_m with llama.cpp, and decodes a few tokens from each file with llama-cpp-python's default
parameters, each in a child process, so a crash is a result to report, not the end of us.

    tunefile doctor            # prints the CPU features llama.cpp was built with, and one line a file
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from builder.errors import TunefileError
from builder.export.quantize import quantize_file

SIZE = 256          # hidden and intermediate size: K-quants need multiples of 256
VOCAB_WORDS = ("hello", "world", "the", "a", "is", "rain", "sun")
SMOKE_TYPES = ("q8_0", "q4_k_m")
DECODE_TOKENS = 4
CHILD_TIMEOUT_S = 120
REBUILD = ("rebuild llama-cpp-python with the portable flags: rm -rf ~/.cache/tunefile/wheels .venv && make setup "
           "(the flags are LLAMA_CMAKE_ARGS in the Makefile; the README's 'llama.cpp build' section says why)")

_CHILD = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
try:
    out = llm.create_completion("hello world", max_tokens=int(sys.argv[2]), temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1, out
finally:
    llm.close()
"""


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 1-layer Llama with random f16 weights and a byte-fallback SentencePiece vocabulary."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *(f"▁{w}" for w in VOCAB_WORDS)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
             *[gguf.TokenType.BYTE] * 256, *[gguf.TokenType.NORMAL] * len(VOCAB_WORDS)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tunefile-doctor")
    writer.add_context_length(64)
    writer.add_embedding_length(SIZE)
    writer.add_block_count(1)
    writer.add_feed_forward_length(SIZE)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(SIZE // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(VOCAB_WORDS))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)

    vocab = len(tokens)
    writer.add_tensor("token_embd.weight", matrix(vocab, SIZE))
    writer.add_tensor("output_norm.weight", np.ones(SIZE, dtype=np.float32))
    writer.add_tensor("output.weight", matrix(vocab, SIZE))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(SIZE, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", matrix(SIZE, SIZE))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(SIZE, dtype=np.float32))
    for name in ("ffn_gate", "ffn_up", "ffn_down"):
        writer.add_tensor(f"blk.0.{name}.weight", matrix(SIZE, SIZE))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def system_info() -> str:
    """The CPU features llama.cpp was built for and found, as llama_print_system_info says."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()


def decode_in_child(path: Path) -> tuple[bool, str]:
    """Load path with default parameters and decode a few tokens in a child process."""
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(DECODE_TOKENS)],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {CHILD_TIMEOUT_S} s"
    if done.returncode == 0:
        return True, "ok"
    if done.returncode < 0:
        return False, f"killed by {signal.Signals(-done.returncode).name}"
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return False, f"exit {done.returncode}: {last}"


@contextlib.contextmanager
def native_stderr_to(path: Path):
    """llama.cpp's quantizer logs every tensor on fd 2: keep that in a file, shown on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def run_doctor(out=None) -> None:
    """Print one line per check; raise TunefileError naming what failed and how to rebuild."""
    print(f"llama.cpp: {system_info()}", file=out)
    failures = []
    with tempfile.TemporaryDirectory(prefix="tunefile-doctor-") as tmp:
        f16 = Path(tmp) / "tiny-f16.gguf"
        write_tiny_gguf(f16)
        files = [("f16", f16)]
        log = Path(tmp) / "quantize.log"
        for quant in SMOKE_TYPES:
            target = Path(tmp) / f"tiny-{quant}.gguf"
            try:
                with native_stderr_to(log):
                    quantize_file(f16, target, quant)
            except TunefileError as exc:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise TunefileError(f"{exc}: {tail}; {REBUILD}") from None
            files.append((quant, target))
        for name, path in files:
            ok, detail = decode_in_child(path)
            print(f"{'ok  ' if ok else 'FAIL'} {name}: load with default parameters and decode {DECODE_TOKENS} "
                  f"tokens: {detail}", file=out)
            if not ok:
                failures.append(f"{name} ({detail})")
    if failures:
        raise TunefileError(f"llama-cpp-python cannot run GGUF files on this CPU: {', '.join(failures)}; {REBUILD}")

"""eval@T stage: load the quantized GGUF with llama-cpp-python and measure it.

metrics.json: file size; perplexity on the assistant tokens of a few eval examples; one greedy
chat completion rendered by the template stored in the GGUF; and the template round trip (the
GGUF's template equals the training template, and llama.cpp's tokens for an eval conversation
equal the training tokens).
"""
from __future__ import annotations

import json
import os
import time

from builder.stages import StageContext
from builder.stages.gguf import gguf_name
from builder.templates import read_template

EVAL_EXAMPLES = 8
MAX_NEW_TOKENS = 32


def perplexity(llm, rows: list[dict]) -> tuple[float | None, int]:
    """exp(mean NLL) over the trained tokens (labels != -100), from llama.cpp's logits."""
    import numpy as np

    total, count = 0.0, 0
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        targets = np.asarray(ids[1:])
        trained = np.asarray(labels[1:]) != -100
        peak = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        nll = log_norm - logits[np.arange(len(targets)), targets]
        total += float(nll[trained].sum())
        count += int(trained.sum())
    return (float(np.exp(total / count)) if count else None), count


def template_round_trip(llm, template: str, row: dict) -> dict:
    """Render the eval conversation with the GGUF's own template through llama-cpp-python."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    stored = llm.metadata.get("tokenizer.chat_template")
    if stored is None:
        return {"template_equal": False, "tokens_equal": False}

    def token_text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    formatter = Jinja2ChatFormatter(template=stored, eos_token=token_text(llm.token_eos()),
                                    bos_token=token_text(llm.token_bos()), add_generation_prompt=False)
    prompt = formatter(messages=row["messages"]).prompt
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    return {"template_equal": stored == template, "tokens_equal": tokens == list(row["input_ids"])}


def run(ctx: StageContext) -> dict:
    import llama_cpp
    import pyarrow.parquet as pq

    quant = ctx.stage.param
    path = ctx.input_dir(f"quantize@{quant}") / gguf_name(quant)
    rows = pq.read_table(ctx.input_dir("dataset") / "eval.parquet").to_pylist()[:EVAL_EXAMPLES]
    if not rows:  # a recipe with eval_fraction 0: measure on training examples instead
        rows = pq.read_table(ctx.input_dir("dataset") / "train.parquet").to_pylist()[:EVAL_EXAMPLES]
    template = read_template(ctx.recipe.template, ctx.project.root, ctx.input_dir("base"))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx.recipe.train.max_length + MAX_NEW_TOKENS,
                          logits_all=True, seed=0, n_threads=os.cpu_count() or 1, verbose=False)
    try:
        ppl, scored = perplexity(llm, rows)
        prompt = rows[0]["messages"][:-1]  # up to the last user turn
        llm.reset()
        started = time.time()
        reply = llm.create_chat_completion(messages=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0.0, seed=0)
        seconds = time.time() - started
        round_trip = template_round_trip(llm, template, rows[0])
    finally:
        llm.close()
    generated = reply["usage"]["completion_tokens"]
    metrics = {
        "quant": quant,
        "file_bytes": path.stat().st_size,
        "perplexity": round(ppl, 4) if ppl is not None else None,
        "perplexity_tokens": scored,
        "eval_examples": len(rows),
        "generated_tokens": generated,
        "generation": reply["choices"][0]["message"]["content"],
        "generation_tokens_per_second": round(generated / seconds, 1) if seconds else None,
        "template_roundtrip": round_trip,
    }
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return {k: metrics[k] for k in ("perplexity", "file_bytes", "generated_tokens", "template_roundtrip")}

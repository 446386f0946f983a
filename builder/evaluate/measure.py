"""What one open GGUF file is measured on besides the checks: perplexity on the assistant tokens
of a few eval examples, one greedy chat completion, and the template round trip.

    rows = read_head(dataset_dir / "eval.parquet", 8)
    metrics = measure_file(llm, base, template, recipe.no_end_of_turn, rows, merged_template)

`template_round_trip`: the GGUF's template equals the training template, and llama.cpp's tokens
for an eval conversation equal the training tokens. `template_checks`: what else must hold for
inference to see what training saw: the merged model's tokenizer files carry the training
template, llama-cpp-python chats with the GGUF's template (not a built-in format it guessed), the
prompt it builds for the eval conversation (add_generation_prompt) is token for token the start of
the training tokens, the end-of-turn marker is one token llama.cpp stops on, and llama.cpp adding
BOS to the rendered prompt would not double it.
"""
from __future__ import annotations

import time
from pathlib import Path

from builder.evaluate.answers import answer
from builder.llm.llama import format_chat, log_softmax_rows, token_text
from builder.templates import append_eos, render_chat, stop_texts

MAX_NEW_TOKENS = 32  # of the one greedy chat completion


def read_head(path: Path, count: int) -> list[dict]:
    """The first `count` rows of a split file, read batch by batch (no split is read whole)."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(count, 1)):
        rows += batch.to_pylist()
        if len(rows) >= count:
            break
    return rows[:count]


def perplexity(llm, rows: list[dict]) -> tuple[float | None, int]:
    """exp(mean NLL) over the trained tokens (labels != -100), from llama.cpp's logits."""
    import numpy as np

    total, count = 0.0, 0
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        llm.reset()
        llm.eval(ids)
        logp = log_softmax_rows(llm.scores[: len(ids) - 1])
        targets = np.asarray(ids[1:])
        trained = np.asarray(labels[1:]) != -100
        total -= float(logp[np.arange(len(targets)), targets][trained].sum())
        count += int(trained.sum())
    return (float(np.exp(total / count)) if count else None), count


def _policy(llm) -> str:
    return llm.metadata.get("tunefile.no_end_of_turn", "append_eos")


def template_round_trip(llm, template: str, row: dict) -> dict:
    """Render the eval conversation with the GGUF's own template through llama-cpp-python. For a
    template without an end-of-turn token trained with append_eos, the EOS training appended after
    each answer is put in the same places before comparing tokens."""
    stored = llm.metadata.get("tokenizer.chat_template")
    if stored is None:
        return {"template_equal": False, "tokens_equal": False}
    eos = token_text(llm, llm.token_eos())

    def appended(text: str) -> str:
        rendered = render_chat(stored, row["messages"], bos_token=token_text(llm, llm.token_bos()), eos_token=eos)
        return append_eos(rendered, eos).text if rendered.text == text else text

    edit = appended if _policy(llm) == "append_eos" and eos else None
    _, tokens = format_chat(llm, stored, row["messages"], add_generation_prompt=False, edit=edit)
    return {"template_equal": stored == template, "tokens_equal": tokens == list(row["input_ids"])}


def template_checks(llm, template: str, row: dict, merged_template: str | None) -> dict:
    """The rest of the round trip, each check True when inference sees what training saw."""
    import llama_cpp

    stored = llm.metadata.get("tokenizer.chat_template") or ""
    messages = row["messages"]
    last_answer = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text, prompt = format_chat(llm, stored, messages[:last_answer], add_generation_prompt=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos, eos = token_text(llm, llm.token_bos()), token_text(llm, llm.token_eos())
    stops = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
             for s in stop_texts(template, _policy(llm), bos_token=bos, eos_token=eos)]
    # llama.cpp's server path tokenizes the rendered prompt adding BOS when the GGUF asks for it.
    with_bos = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    return {
        "merged_template_equal": merged_template == template,
        "chat_format_is_gguf_template": llm.chat_format == "chat_template.default",
        "prompt_tokens_prefix_training": list(row["input_ids"][: len(prompt)]) == prompt,
        "end_of_turn_is_stop_token": bool(stops) and all(
            len(t) == 1 and bool(llama_cpp.llama_vocab_is_eog(vocab, t[0])) for t in stops),
        "no_double_bos": with_bos[:2] != [llm.token_bos()] * 2,
    }


def measure_file(llm, base: bool, template: str, policy: str, rows: list[dict], merged_template: str | None) -> dict:
    """Perplexity on `rows`, the greedy answer to the first one (and its speed), and for a tuned
    file the template round trip and checks (the base GGUF holds the base tokenizer's template, or
    none: both are None)."""
    ppl, scored = perplexity(llm, rows)
    started = time.time()
    first = answer(llm, base, template, policy, rows[0]["messages"][:-1], MAX_NEW_TOKENS)
    seconds = time.time() - started
    round_trip = template_round_trip(llm, template, rows[0]) if not base else None
    checks = template_checks(llm, template, rows[0], merged_template) if not base else None
    return {
        "perplexity": round(ppl, 4) if ppl is not None else None,
        "perplexity_tokens": scored,
        "eval_examples": len(rows),
        "generated_tokens": first["tokens"],
        "generation": first["text"],
        "generation_tokens_per_second": round(first["tokens"] / seconds, 1) if seconds else None,
        "template_roundtrip": round_trip,
        "template_checks": checks,
    }

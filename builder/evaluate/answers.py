"""Greedy answers of one GGUF file, and the instruction-following numbers measured on them.

    metrics, records = instruction_checks(llm, cache, recipe, project_root, base, template, eval_rows)

The verifiable checks run on `evaluate.prompts` (builder/evaluate/ifeval.py); the stop rate and
answer lengths on the eval split's prompts. Every answer is kept in the item cache, so a rerun or
another quant type's eval answers only what is new. A tuned GGUF is prompted as llama-cpp-python's
chat handler prompts it; the base model as the tuned files are (see _prompting).

An answer is `stopped` only when it ended at the template's end-of-turn marker (`<|im_end|>`), the
token training taught it to write there; `stopped_at` says where each answer ended (STOPPED_AT):
llama.cpp also ends generation at EOS and other end-of-generation tokens, and those stops are
counted apart (`eos_stop_rate`, `stopped_at`), never as a stop.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path

from builder.evaluate.ifeval import read_prompts, score, verdicts
from builder.llm.items import ItemCache
from builder.llm.llama import BatchGenerator, format_chat, token_text
from builder.templates import stop_texts

# Where an answer ended: the end-of-turn marker; EOS where the template closes turns with something
# else; another end-of-generation token or stop text; or the max_tokens budget.
STOPPED_AT = ("end_of_turn", "eos", "other", "max_tokens")
ANSWER_VERSION = 2  # in every cached answer's request: bump when what an answer holds changes (2: stopped_on)


def _prompting(llm, base: bool, template: str, policy: str) -> tuple[str, list[str]]:
    """(chat template, stop texts) an answer is generated with. The base model gets the recipe's
    template and its end-of-turn texts (its GGUF holds the base tokenizer's template, or none); a
    tuned file its own template and the EOS text, as llama-cpp-python's chat handler does."""
    bos, eos = token_text(llm, llm.token_bos()), token_text(llm, llm.token_eos())
    if base:
        return template, stop_texts(template, policy, bos_token=bos, eos_token=eos)
    return llm.metadata.get("tokenizer.chat_template") or template, [eos]


def stopped_at(stopped_on: str | None, end_of_turn: list[str], eos: str) -> str:
    """Where an answer that stopped on `stopped_on` (a token's or stop text, None: max_tokens) ended,
    one of STOPPED_AT. `end_of_turn`: the template's stop texts; EOS is one of them only for a
    template that writes no end-of-turn token and appends EOS to answers in training."""
    if stopped_on is None:
        return "max_tokens"
    if stopped_on.strip() in end_of_turn:
        return "end_of_turn"
    return "eos" if stopped_on == eos else "other"


def classified(result: dict, end_of_turn: list[str], eos: str) -> dict:
    """A generated answer with `stopped` true only at the end-of-turn marker, and `stopped_at`."""
    at = stopped_at(result["stopped_on"], end_of_turn, eos)
    return {**result, "stopped": at == "end_of_turn", "stopped_at": at}


def answer(llm, base: bool, template: str, policy: str, messages: list[dict], max_tokens: int) -> dict:
    """A greedy answer, one sequence: {text, tokens}. A tuned GGUF chats through llama-cpp-python's
    chat handler; the base model is prompted as the tuned files are (see _prompting)."""
    llm.reset()
    if base:
        chat, stops = _prompting(llm, base, template, policy)
        out = llm.create_completion(format_chat(llm, chat, messages, add_generation_prompt=True)[1],
                                    max_tokens=max_tokens, temperature=0.0, seed=0, stop=stops or None)
        text = out["choices"][0]["text"]
    else:
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0)
        text = out["choices"][0]["message"]["content"] or ""
    return {"text": text, "tokens": out["usage"]["completion_tokens"]}


def cached_answers(cache: ItemCache, llm, base: bool, template: str, policy: str, conversations: list[list[dict]],
                   max_tokens: int) -> list[dict]:
    """A greedy answer for each conversation, as BatchGenerator gives it and classified (where it
    stopped): from the item cache, the rest generated together, several sequences per llama.cpp
    decode. On an f16 file these are the answers one at a time gives (the end-to-end test compares
    them); quantized kernels can round differently with the batch, and a near-tie can then pick
    another token."""
    requests = [{"messages": messages, "max_tokens": max_tokens, "policy": policy, "version": ANSWER_VERSION}
                for messages in conversations]
    found = [cache.get("answer", request) for request in requests]
    todo = [k for k, f in enumerate(found) if f is None]
    if todo:
        chat, stops = _prompting(llm, base, template, policy)
        prompts = [format_chat(llm, chat, conversations[k], add_generation_prompt=True)[1] for k in todo]
        generator = BatchGenerator(llm)
        try:
            made = generator.generate(prompts, [stops] * len(todo), max_tokens)
        finally:
            generator.close()
        for k, result in zip(todo, made):
            found[k] = result
            cache.put("answer", requests[k], result)
    # What ends an answer is the training template's marker (a tuned file's template is the same text).
    eos = token_text(llm, llm.token_eos())
    end_of_turn = [t.strip() for t in stop_texts(template, policy, bos_token=token_text(llm, llm.token_bos()),
                                                 eos_token=eos)]
    return [classified(result, end_of_turn, eos) for result in found]


def with_system(system_prompt: str | None, messages: list[dict]) -> list[dict]:
    """Messages as training saw them: the recipe's system prompt first where none is given."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def stop_metrics(held: list[dict]) -> dict:
    """The stop rate (ended at the end-of-turn marker), the EOS stop rate, where each answer ended
    (counts by STOPPED_AT) and the answers' lengths, over the eval split's answers."""
    ends = Counter(a["stopped_at"] for a in held)
    lengths = [a["tokens"] for a in held]
    return {"stop_rate": round(ends["end_of_turn"] / len(held), 4), "eos_stop_rate": round(ends["eos"] / len(held), 4),
            "stopped_at": {at: ends[at] for at in STOPPED_AT}, "stop_prompts": len(held),
            "answer_tokens_mean": round(statistics.mean(lengths), 2),
            "answer_tokens_median": statistics.median(lengths), "answer_tokens_max": max(lengths)}


def _last_answer(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def instruction_checks(llm, cache: ItemCache, recipe, root: Path, base: bool, template: str,
                       rows: list[dict]) -> tuple[dict, list[dict]]:
    """The verifiable checks on evaluate.prompts, and the stop rate and answer lengths on the eval
    split's prompts (each conversation up to its last user turn); and every answer, as a record."""
    spec, policy = recipe.evaluate, recipe.no_end_of_turn
    started = time.perf_counter()
    out: dict = {}
    records = []
    if spec.prompts:
        prompts = read_prompts(root / spec.prompts, spec.prompts)
        conversations = [with_system(recipe.system_prompt, [{"role": "user", "content": p.prompt}]) for p in prompts]
        answers = cached_answers(cache, llm, base, template, policy, conversations, spec.max_tokens)
        out.update(score(prompts, [(a["text"], a["stopped"]) for a in answers]))
        records += [{"kind": "prompt", "prompt": p.prompt, **a,
                     "checks": [{"check": name, "strict": strict, "loose": loose}
                                for name, strict, loose in verdicts(p, a["text"], a["stopped"])]}
                    for p, a in zip(prompts, answers)]
    lasts = [_last_answer(row["messages"]) for row in rows[:spec.stop_examples]]
    held = cached_answers(cache, llm, base, template, policy,
                          [row["messages"][:last] for row, last in zip(rows, lasts)], spec.max_tokens)
    records += [{"kind": "eval_split", "prompt": row["messages"][last - 1]["content"], **a}
                for row, last, a in zip(rows, lasts, held)]
    if held:
        out.update(stop_metrics(held))
    seconds = time.perf_counter() - started
    out["items_per_second"] = round(len(records) / seconds, 2) if seconds and cache.misses else None
    return out, records

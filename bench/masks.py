"""Benchmark: what exact loss masks cost, against transformers' own assistant-mask path.

    .venv/bin/python bench/masks.py [--quick]

1. Per-conversation time of render_chat (text + trained spans) and of tokenize_chat (text, token
   ids and labels in one step) for 2, 10, 40 and 80 turns, on the built-in chatml, llama-3 and
   gemma templates and on a ChatML template with {% generation %} markers. Target: 80 turns take
   at most ~2.2x the time of 40 (linear in conversation length).
2. Conversations per second over a mixed set (1 to 6 turns) on the template with generation
   markers: tokenize_chat vs transformers' apply_chat_template(tokenize=True, return_dict=True,
   return_assistant_tokens_mask=True); and whether the two masks agree token for token (the
   generation blocks hold exactly answer + <|im_end|>, which is what tunefile trains).
Prints numbers and ratios; exits 0. Builds the builtin tiny tokenizer in-process (about 1 s).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.templates import BUILTIN_TEMPLATES, render_chat
from builder.templates.tokens import IGNORE_INDEX, tokenize_chat

GENERATION_CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{%- generation %}{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WORDS = ("the rain falls on a quiet town while people walk home with bread and news of the day "
         "sun river market colour answer question small large early late").split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def conversation(rng: random.Random, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    for _ in range(turns):
        messages += [{"role": "user", "content": sentence(rng, 5, 15)},
                     {"role": "assistant", "content": sentence(rng, 10, 30)}]
    return messages


def per_call(fn, repeats: int) -> float:
    """Best of 5 rounds of `repeats` calls, in seconds per call."""
    fn()  # warm caches (compiled template, end-of-turn marker)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def hf_masks(tokenizer, template: str, messages: list[dict]) -> dict:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and conversations")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from builder.models import BUILTIN_MODELS
    from builder.models.tiny_llama import train_tokenizer

    hf_logging.set_verbosity_error()
    tokenizer = train_tokenizer(BUILTIN_MODELS["tiny-llama"])
    rng = random.Random(0)
    scale = 0.2 if args.quick else 1.0
    templates = {name: BUILTIN_TEMPLATES[name].read_text() for name in ("chatml", "llama-3", "gemma")}
    templates["chatml+generation"] = GENERATION_CHATML

    print("1. time per conversation (microseconds), best of 5 rounds")
    print(f"{'template':<18} {'turns':>5} {'render_chat':>12} {'tokenize_chat':>14} {'HF mask path':>13}")
    for name, template in templates.items():
        times = {}
        for turns in (2, 10, 40, 80):
            messages = conversation(rng, turns)
            repeats = max(5, int(2000 * scale / turns))
            render = per_call(lambda t=template, m=messages: render_chat(t, m), repeats)
            tokens = per_call(lambda t=template, m=messages: tokenize_chat(t, m, tokenizer), repeats)
            hf = (per_call(lambda t=template, m=messages: hf_masks(tokenizer, t, m), repeats)
                  if name == "chatml+generation" else None)
            times[turns] = render
            hf_text = f"{hf * 1e6:13.0f}" if hf is not None else f"{'-':>13}"
            print(f"{name:<18} {turns:>5} {render * 1e6:12.0f} {tokens * 1e6:14.0f} {hf_text}")
        print(f"{name:<18} render_chat 80/40 turns: {times[80] / times[40]:.2f}x (target <= 2.2x)")

    count = int(2000 * scale)
    mixed = [conversation(rng, rng.randint(1, 6)) for _ in range(count)]
    started = time.perf_counter()
    ours = [tokenize_chat(GENERATION_CHATML, m, tokenizer) for m in mixed]
    ours_rate = count / (time.perf_counter() - started)
    started = time.perf_counter()
    theirs = [hf_masks(tokenizer, GENERATION_CHATML, m) for m in mixed]
    hf_rate = count / (time.perf_counter() - started)
    agree = sum(o.input_ids == list(t["input_ids"])
                and [int(label != IGNORE_INDEX) for label in o.labels] == list(t["assistant_masks"])
                for o, t in zip(ours, theirs))
    print(f"\n2. {count} conversations of 1-6 turns, template with {{% generation %}} markers")
    print(f"tunefile tokenize_chat (ids + labels): {ours_rate:8.0f} conversations/s")
    print(f"transformers assistant-mask path:      {hf_rate:8.0f} conversations/s")
    print(f"ratio: {ours_rate / hf_rate:.2f}x; masks identical on {agree}/{count} conversations")


if __name__ == "__main__":
    main()

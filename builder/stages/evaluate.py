"""eval@T stage: load the quantized GGUF with llama-cpp-python and measure it.

metrics.json: file size; perplexity on the assistant tokens of a few eval examples; one greedy
chat completion rendered by the template stored in the GGUF; the template round trip (the GGUF's
template equals the training template, and llama.cpp's tokens for an eval conversation equal the
training tokens); and `template_checks`, what else must hold for inference to see what training
saw: the merged model's tokenizer files carry the training template, llama-cpp-python chats with
the GGUF's template (not a built-in format it guessed), the prompt it builds for the eval
conversation (add_generation_prompt) is token for token the start of the training tokens, the
end-of-turn marker is one token llama.cpp stops on, and llama.cpp adding BOS to the rendered
prompt would not double it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from builder import __version__
from builder.errors import StageError
from builder.files import write_jsonl
from builder.stages import StageContext
from builder.stages.gguf import gguf_name
from builder.templates import append_eos, read_template, render_chat, saved_chat_template, stop_texts

EVAL_EXAMPLES = 8
MAX_NEW_TOKENS = 32


def perplexity(llm, rows: list[dict]) -> tuple[float | None, int]:
    """exp(mean NLL) over the trained tokens (labels != -100), from llama.cpp's logits."""
    import numpy as np

    from builder.evaluate.lmeval import log_softmax_rows

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


def _token_text(llm, token_id: int) -> str:
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""


def format_chat(llm, template: str, messages: list[dict], add_generation_prompt: bool,
                 edit=None) -> tuple[str, list[int]]:
    """What llama-cpp-python's chat handler feeds the model: the GGUF template rendered by its Jinja
    formatter, tokenized with special tokens and no extra BOS (the formatter owns BOS)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=_token_text(llm, llm.token_eos()),
                                    bos_token=_token_text(llm, llm.token_bos()),
                                    add_generation_prompt=add_generation_prompt)
    result = formatter(messages=messages)
    prompt = edit(result.prompt) if edit else result.prompt  # edit: what training did to the text
    return prompt, llm.tokenize(prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def _policy(llm) -> str:
    return llm.metadata.get("tunefile.no_end_of_turn", "append_eos")


def template_round_trip(llm, template: str, row: dict) -> dict:
    """Render the eval conversation with the GGUF's own template through llama-cpp-python. For a
    template without an end-of-turn token trained with append_eos, the EOS training appended after
    each answer is put in the same places before comparing tokens."""
    stored = llm.metadata.get("tokenizer.chat_template")
    if stored is None:
        return {"template_equal": False, "tokens_equal": False}
    eos = _token_text(llm, llm.token_eos())

    def appended(text: str) -> str:
        rendered = render_chat(stored, row["messages"], bos_token=_token_text(llm, llm.token_bos()), eos_token=eos)
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
    bos, eos = _token_text(llm, llm.token_bos()), _token_text(llm, llm.token_eos())
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


BASE_GGUF_VERSION = 1  # bump when the base GGUF's bytes change on purpose


def base_gguf_key(ctx: StageContext, dtype: str) -> str:
    from builder.hashing import hash_value
    from builder.versions import library_version

    return hash_value({"base": ctx.plan["base"].key, "dtype": dtype, "version": BASE_GGUF_VERSION,
                       "llama_cpp_python": library_version("llama_cpp_python")})


def base_gguf(ctx: StageContext, dtype: str) -> Path:
    """The base model as a GGUF file, converted by the same converter as the tuned model and kept
    in the store under the base key: every recipe on that base shares one file."""
    from builder.stages.gguf import convert_model
    from builder.store import StageStore

    key = base_gguf_key(ctx, dtype)
    store = StageStore(ctx.project.cache_dir, "base-gguf")
    entry = store.verified(key)
    if entry is None:
        scratch = ctx.out_dir / ".base-gguf"
        scratch.mkdir()
        metadata = {"tunefile.version": __version__, "tunefile.base_model": ctx.recipe.base.model,
                    "tunefile.base_key": ctx.plan["base"].key}
        convert_model(ctx.recipe, ctx.input_dir("base"), scratch / gguf_name(dtype), dtype, "base", metadata)
        store.put(key, scratch)  # hashes the file once; no need to verify what was just stored
        shutil.rmtree(scratch)
        entry = store.entry(key)
    return entry / gguf_name(dtype)


def _prompting(llm, base: bool, template: str, policy: str) -> tuple[str, list[str]]:
    """(chat template, stop texts) an answer is generated with. The base model gets the recipe's
    template and its end-of-turn texts (its GGUF holds the base tokenizer's template, or none); a
    tuned file its own template and the EOS text, as llama-cpp-python's chat handler does."""
    bos, eos = _token_text(llm, llm.token_bos()), _token_text(llm, llm.token_eos())
    if base:
        return template, stop_texts(template, policy, bos_token=bos, eos_token=eos)
    return llm.metadata.get("tokenizer.chat_template") or template, [eos]


def answer(llm, base: bool, template: str, policy: str, messages: list[dict], max_tokens: int) -> dict:
    """A greedy answer, one sequence: {text, tokens, stopped (ended at the end-of-turn marker, not
    at max_tokens)}. A tuned GGUF chats through llama-cpp-python's chat handler; the base model is
    prompted as the tuned files are (see _prompting)."""
    llm.reset()
    if base:
        chat, stops = _prompting(llm, base, template, policy)
        out = llm.create_completion(format_chat(llm, chat, messages, add_generation_prompt=True)[1],
                                    max_tokens=max_tokens, temperature=0.0, seed=0, stop=stops or None)
        text = out["choices"][0]["text"]
    else:
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0)
        text = out["choices"][0]["message"]["content"] or ""
    return {"text": text, "tokens": out["usage"]["completion_tokens"], "stopped": out["choices"][0]["finish_reason"] == "stop"}


def cached_answers(cache, llm, base: bool, template: str, policy: str, conversations: list[list[dict]],
                   max_tokens: int) -> list[dict]:
    """answer() for each conversation: from the item cache, the rest generated together, several
    sequences per llama.cpp decode. On an f16 file these are the answers one at a time gives (the
    end-to-end test compares them); quantized kernels can round differently with the batch, and a
    near-tie can then pick another token."""
    from builder.evaluate.lmeval import BatchGenerator

    requests = [{"messages": messages, "max_tokens": max_tokens, "policy": policy} for messages in conversations]
    found = [cache.get("answer", request) for request in requests]
    todo = [k for k, f in enumerate(found) if f is None]
    if todo:
        chat, stops = _prompting(llm, base, template, policy)
        generator = BatchGenerator(llm)
        try:
            made = generator.generate([format_chat(llm, chat, conversations[k], add_generation_prompt=True)[1] for k in todo],
                                      [stops] * len(todo), max_tokens)
        finally:
            generator.close()
        for k, result in zip(todo, made):
            found[k] = result
            cache.put("answer", requests[k], result)
    return found


def with_system(system_prompt: str | None, messages: list[dict]) -> list[dict]:
    """Messages as training saw them: the recipe's system prompt first where none is given."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def instruction_checks(ctx: StageContext, llm, cache, base: bool, template: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """The verifiable checks on evaluate.prompts, and the stop rate and answer lengths on the eval
    split's prompts (each conversation up to its last user turn); and every answer, as a record."""
    import statistics

    from builder.evaluate.ifeval import read_prompts, score, verdicts

    spec, recipe = ctx.recipe.evaluate, ctx.recipe
    policy = recipe.no_end_of_turn
    started = time.perf_counter()
    out: dict = {}
    records = []
    if spec.prompts:
        prompts = read_prompts(ctx.project.root / spec.prompts, spec.prompts)
        answers = cached_answers(cache, llm, base, template, policy,
                                 [with_system(recipe.system_prompt, [{"role": "user", "content": p.prompt}]) for p in prompts],
                                 spec.max_tokens)
        out.update(score(prompts, [(a["text"], a["stopped"]) for a in answers]))
        records += [{"kind": "prompt", "prompt": p.prompt, **a,
                     "checks": [{"check": name, "strict": strict, "loose": loose}
                                for name, strict, loose in verdicts(p, a["text"], a["stopped"])]}
                    for p, a in zip(prompts, answers)]
    lasts = [max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant") for row in rows[:spec.stop_examples]]
    held = cached_answers(cache, llm, base, template, policy, [row["messages"][:last] for row, last in zip(rows, lasts)],
                          spec.max_tokens)
    records += [{"kind": "eval_split", "prompt": row["messages"][last - 1]["content"], **a}
                for row, last, a in zip(rows, lasts, held)]
    if held:
        lengths = [a["tokens"] for a in held]
        out.update({"stop_rate": round(sum(a["stopped"] for a in held) / len(held), 4), "stop_prompts": len(held),
                    "answer_tokens_mean": round(statistics.mean(lengths), 2),
                    "answer_tokens_median": statistics.median(lengths), "answer_tokens_max": max(lengths)})
    seconds = time.perf_counter() - started
    out["items_per_second"] = round(len(records) / seconds, 2) if seconds and cache.misses else None
    return out, records


def run_judge(ctx: StageContext, records: list[dict]) -> tuple[dict, dict]:
    """The pairwise judge of this file's answers against the base model's (eval@base's answers.jsonl):
    metrics, the verdict cache's counts, and judge.jsonl with every judge prompt and raw reply.
    Verdicts are cached by judge and judge prompt (the question and both answers), whichever file
    gave the answers."""
    from builder.evaluate.judge import GgufJudge, OpenAIJudge, Pair, judge_pairs
    from builder.evaluate.lmeval import ItemCache
    from builder.hashing import hash_file
    from builder.llm.served import api_key

    spec, endpoints = ctx.recipe.evaluate.judge, ctx.project.params.endpoints
    base_file = ctx.input_dir("eval@base") / "answers.jsonl"
    base_records = [json.loads(line) for line in base_file.read_text(encoding="utf-8").splitlines()] if base_file.is_file() else []
    pairs = [Pair(t["prompt"], t["text"], b["text"]) for t, b in zip(records, base_records) if t["prompt"] == b["prompt"]]
    if spec.gguf:
        path = ctx.project.root / spec.gguf
        if not path.is_file():
            raise StageError(f"evaluate.judge.gguf: {spec.gguf} is not a file")
        identity, judge, concurrency = f"gguf:{hash_file(path)}", GgufJudge(path), 1
    else:
        key = api_key(ctx.project, "evaluate.judge")
        served = spec.openai
        identity = f"openai:{served.model}" + (f"@{served.revision}" if served.revision else "")
        judge = OpenAIJudge(served.base_url, served.model, key, endpoints.timeout_s, endpoints.retries)
        concurrency = endpoints.concurrency
    cache = ItemCache(ctx.project.cache_dir / "eval-items.sqlite", identity)
    try:
        metrics, judged = judge_pairs(judge, identity, pairs, cache, concurrency)
    finally:
        judge.close()
        cache.close()
    write_jsonl(ctx.out_dir / "judge.jsonl", judged)
    return metrics, {"hits": cache.hits, "computed": cache.misses}


def _head(path: Path, count: int) -> list[dict]:
    """The first `count` rows of a split file, read batch by batch."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(count, 1)):
        rows += batch.to_pylist()
        if len(rows) >= count:
            break
    return rows[:count]


def run(ctx: StageContext) -> dict:
    import llama_cpp

    from builder.evaluate.lmeval import ItemCache, run_tasks

    quant = ctx.stage.param
    base = quant == "base"
    if base:
        path = base_gguf(ctx, ctx.stage.inputs["recipe"]["dtype"])
        model_key = base_gguf_key(ctx, ctx.stage.inputs["recipe"]["dtype"])
    else:
        producer = f"quantize@{quant}" if f"quantize@{quant}" in ctx.stage.upstream else "gguf"
        path = ctx.input_dir(producer) / gguf_name(quant)
        model_key = ctx.plan[producer].key
    spec = ctx.recipe.evaluate
    wanted = max(EVAL_EXAMPLES, spec.stop_examples if spec else 0)  # rows read: no split is read whole
    # A recipe with eval_fraction 0 is measured on training examples instead.
    eval_rows = _head(ctx.input_dir("dataset") / "eval.parquet", wanted) or \
        _head(ctx.input_dir("dataset") / "train.parquet", wanted)
    rows = eval_rows[:EVAL_EXAMPLES]
    template = read_template(ctx.recipe.template, ctx.project.root, ctx.input_dir("base"))
    n_ctx = ctx.recipe.train.max_length + max(MAX_NEW_TOKENS, spec.max_tokens if spec else 0)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, seed=0,
                          n_threads=os.cpu_count() or 1, verbose=False)
    cache = ItemCache(ctx.project.cache_dir / "eval-items.sqlite", model_key)
    try:
        ppl, scored = perplexity(llm, rows)
        started = time.time()
        first = answer(llm, base, template, ctx.recipe.no_end_of_turn, rows[0]["messages"][:-1], MAX_NEW_TOKENS)
        seconds = time.time() - started
        round_trip = checks = None
        if not base:  # the base GGUF holds the base tokenizer's template (or none)
            round_trip = template_round_trip(llm, template, rows[0])
            checks = template_checks(llm, template, rows[0], saved_chat_template(ctx.input_dir("merge")))
        instructions = tasks = judged = None
        speed: dict = {}
        if spec is not None:
            instructions, answers = instruction_checks(ctx, llm, cache, base, template, eval_rows)
            write_jsonl(ctx.out_dir / "answers.jsonl", answers)
            if spec.tasks:
                started, computed = time.perf_counter(), cache.misses
                tasks = run_tasks(spec, llm, cache, ctx.project.root)
                task_seconds = time.perf_counter() - started
                speed = {"task_requests_computed": cache.misses - computed, "task_seconds": round(task_seconds, 3)}
    finally:
        llm.close()
        cache.close()
    judge_cache = None
    if spec is not None and spec.judge is not None and not base:
        judged, judge_cache = run_judge(ctx, answers)
    metrics = {
        "quant": quant,
        "file_bytes": path.stat().st_size,
        "perplexity": round(ppl, 4) if ppl is not None else None,
        "perplexity_tokens": scored,
        "eval_examples": len(rows),
        "generated_tokens": first["tokens"],
        "generation": first["text"],
        "generation_tokens_per_second": round(first["tokens"] / seconds, 1) if seconds else None,
        "template_roundtrip": round_trip,
        "template_checks": checks,
        **({"checks": instructions} if instructions is not None else {}),
        **({"tasks": tasks} if tasks is not None else {}),
        **({"judge": judged} if judged is not None else {}),
    }
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    summary = {k: metrics[k] for k in ("perplexity", "file_bytes", "generated_tokens", "template_roundtrip",
                                       "template_checks")}
    return {**summary, "item_cache": {"hits": cache.hits, "computed": cache.misses}, **speed,
            **({"judge_cache": judge_cache} if judge_cache else {})}

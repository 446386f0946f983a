"""eval@T stage: load a GGUF file with llama-cpp-python and measure it (eval@base: the base model,
converted by the same converter, measured by the same code).

metrics.json: file size; perplexity on the assistant tokens of a few eval examples, one greedy
chat completion, the template round trip and `template_checks` (builder/evaluate/measure.py); with
an `evaluate` section, the instruction-following checks and stop rate (builder/evaluate/answers.py,
every answer in answers.jsonl), lm-eval task scores (builder/evaluate/lmeval.py) and the pairwise
judge against the base model's answers (builder/evaluate/judge.py, judge.jsonl). Every answer,
task request and verdict is kept in the item cache, so a rerun computes only what is new.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from builder.evaluate.answers import instruction_checks
from builder.evaluate.baseline import base_gguf
from builder.evaluate.judge import judge_answers
from builder.evaluate.lmeval import run_tasks
from builder.evaluate.measure import MAX_NEW_TOKENS, measure_file, read_head
from builder.export.convert import gguf_name
from builder.files import write_json, write_jsonl
from builder.llm.items import ItemCache
from builder.stages import StageContext
from builder.templates import read_template, saved_chat_template

EVAL_EXAMPLES = 8  # rows perplexity is measured on


def run(ctx: StageContext) -> dict:
    import llama_cpp

    recipe, spec, quant = ctx.recipe, ctx.recipe.evaluate, ctx.stage.param
    base = quant == "base"
    path, model_key = _model_file(ctx, quant)
    wanted = max(EVAL_EXAMPLES, spec.stop_examples if spec else 0)  # rows read: no split is read whole
    # A recipe with eval_fraction 0 is measured on training examples instead.
    eval_rows = read_head(ctx.input_dir("dataset") / "eval.parquet", wanted) or \
        read_head(ctx.input_dir("dataset") / "train.parquet", wanted)
    template = read_template(recipe.template, ctx.project.root, ctx.input_dir("base"))
    merged_template = None if base else saved_chat_template(ctx.input_dir("merge"))
    n_ctx = recipe.train.max_length + max(MAX_NEW_TOKENS, spec.max_tokens if spec else 0)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, seed=0,
                          n_threads=os.cpu_count() or 1, verbose=False)
    cache = ItemCache(ctx.project.cache_dir / "eval-items.sqlite", model_key)
    answers: list[dict] = []
    speed: dict = {}
    try:
        measured = measure_file(llm, base, template, recipe.no_end_of_turn, eval_rows[:EVAL_EXAMPLES], merged_template)
        metrics = {"quant": quant, "file_bytes": path.stat().st_size, **measured}
        if spec is not None:
            metrics["checks"], answers = instruction_checks(llm, cache, recipe, ctx.project.root, base, template,
                                                            eval_rows)
            write_jsonl(ctx.out_dir / "answers.jsonl", answers)
        if spec is not None and spec.tasks:
            started, computed = time.perf_counter(), cache.misses
            metrics["tasks"] = run_tasks(spec, llm, cache, ctx.project.root)
            speed = {"task_requests_computed": cache.misses - computed,
                     "task_seconds": round(time.perf_counter() - started, 3)}
    finally:
        llm.close()
        cache.close()
    judge_cache = None
    if spec is not None and spec.judge is not None and not base:
        metrics["judge"], judge_cache, judged = judge_answers(spec.judge, ctx.project, answers,
                                                              ctx.input_dir("eval@base") / "answers.jsonl")
        write_jsonl(ctx.out_dir / "judge.jsonl", judged)
    write_json(ctx.out_dir / "metrics.json", metrics)
    summary = {k: metrics[k] for k in ("perplexity", "file_bytes", "generated_tokens", "template_roundtrip",
                                       "template_checks")}
    return {**summary, "item_cache": {"hits": cache.hits, "computed": cache.misses}, **speed,
            **({"judge_cache": judge_cache} if judge_cache else {})}


def _model_file(ctx: StageContext, quant: str) -> tuple[Path, str]:
    """(the GGUF to measure, the key its cached items go under): the base model's file, converted
    once into the stage store, or the tuned file of type `quant` (quantize@T's, or gguf's own)."""
    if quant == "base":
        return base_gguf(ctx.recipe, ctx.input_dir("base"), ctx.plan["base"].key, ctx.stage.inputs["recipe"]["dtype"],
                         ctx.project.cache_dir, ctx.out_dir / ".base-gguf")
    producer = f"quantize@{quant}" if f"quantize@{quant}" in ctx.stage.upstream else "gguf"
    return ctx.input_dir(producer) / gguf_name(quant), ctx.plan[producer].key

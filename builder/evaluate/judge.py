"""Pairwise judge: tuned vs base answers on the held-out prompts, each pair judged in both orders.

    recipe:      evaluate: {judge: {gguf: models/judge.gguf}}
                 evaluate: {judge: {openai: {base_url: "http://127.0.0.1:8000/v1", model: NAME, revision: R}}}
    params.yaml: endpoints: {api_key_env: OPENAI_API_KEY, concurrency: 4, timeout_s: 60, retries: 3}

    metrics, cache_counts, records = judge_answers(recipe.evaluate.judge, project, answers, base_answers_jsonl)

Each (prompt, tuned answer, base answer) is shown to the judge twice, tuned as A then as B, so a
judge that prefers a position cancels out. A verdict is `[[A]]`, `[[B]]` or `[[C]]` (a tie); the
tuned answer scores 1, 0.5 or 0 per order and a pair scores the mean of its two orders. The win
rate is the mean pair score, with a seeded bootstrap 95% interval over prompts. Replies without a
verdict count as `invalid` and score nothing either way (they are excluded from the rate).

A judge's identity (the key of its cached verdicts) is the GGUF file's digest, or the served model
name and optional `revision`; never the URL, nor the API key, which is read from the environment
variable params.yaml names and goes into no recipe, key, log or file.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import StageError
from builder.files import read_jsonl
from builder.hashing import hash_file
from builder.llm.items import ItemCache
from builder.llm.served import GgufModel, HttpModel, api_key, map_concurrent

JUDGE_PROMPT = """Please act as an impartial judge and evaluate the quality of the responses provided by two AI \
assistants to the user question displayed below. Choose the assistant that follows the user's instructions and \
answers the question better: consider helpfulness, relevance, accuracy and conciseness. Do not let the order of the \
responses, their length or the assistants' names influence you. After a one-sentence explanation, output your final \
verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" \
for a tie.

[User Question]
{question}

[The Start of Assistant A's Answer]
{a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{b}
[The End of Assistant B's Answer]"""
VERDICT = re.compile(r"\[\[([ABC])\]\]")
JUDGE_MAX_TOKENS = 128
BOOTSTRAP = 1000


@dataclass(frozen=True)
class Pair:
    question: str
    tuned: str
    base: str


def verdict(reply: str) -> str | None:
    """'A', 'B' or 'C' from the judge's reply (its last verdict mark), None when there is none."""
    marks = VERDICT.findall(reply)
    return marks[-1] if marks else None


def pair_score(tuned_first: str | None, tuned_second: str | None) -> float | None:
    """The tuned answer's score over both orders (it is A first, then B); None if either is invalid."""
    if tuned_first is None or tuned_second is None:
        return None
    first = {"A": 1.0, "C": 0.5, "B": 0.0}[tuned_first]
    second = {"B": 1.0, "C": 0.5, "A": 0.0}[tuned_second]
    return (first + second) / 2


def win_rate(scores: list[float], seed: int = 0) -> tuple[float | None, list[float] | None]:
    """Mean pair score and a seeded percentile-bootstrap 95% interval over prompts."""
    if not scores:
        return None, None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(BOOTSTRAP))
    return round(sum(scores) / len(scores), 4), [round(means[int(0.025 * BOOTSTRAP)], 4),
                                                  round(means[int(0.975 * BOOTSTRAP) - 1], 4)]


class GgufJudge:
    """A judge GGUF run in process by llama-cpp-python (its own chat template), greedy."""

    def __init__(self, path):
        self.model = GgufModel(path, "evaluate.judge")

    def ask(self, prompt: str) -> str:
        return self.model.chat(prompt, max_tokens=JUDGE_MAX_TOKENS, temperature=0.0, seed=0).text

    def close(self) -> None:
        self.model.close()


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint (builder/llm/served.py: timeouts, retries with backoff, a
    clear error within seconds when nothing listens), greedy."""

    def __init__(self, base_url: str, model: str, key: str | None, timeout_s: float, retries: int):
        self.model = HttpModel(base_url, model, key, timeout_s, retries, "evaluate.judge")

    def ask(self, prompt: str) -> str:
        return self.model.chat(prompt, temperature=0.0, max_tokens=JUDGE_MAX_TOKENS, seed=0).text

    def close(self) -> None:
        self.model.close()


def judge_pairs(judge, identity: str, pairs: list[Pair], cache, concurrency: int = 1) -> tuple[dict, list[dict]]:
    """Every pair judged in both orders (verdicts from the item cache where present): the judge
    metrics and one record per pair (prompts, raw replies, verdicts) for judge.jsonl."""
    prompts = [(p, order, JUDGE_PROMPT.format(question=p.question, a=a, b=b)) for p in pairs
               for order, (a, b) in (("tuned_first", (p.tuned, p.base)), ("base_first", (p.base, p.tuned)))]

    def reply(item: tuple) -> str:
        request = {"judge": identity, "prompt": item[2], "max_tokens": JUDGE_MAX_TOKENS}
        found = cache.get("judge", request)
        if found is None:
            found = judge.ask(item[2])
            cache.put("judge", request, found)
        return found

    replies = map_concurrent(reply, prompts, concurrency)
    records, scores, counts = [], [], {"wins": 0, "ties": 0, "losses": 0, "invalid": 0}
    for k, pair in enumerate(pairs):
        first, second = replies[2 * k], replies[2 * k + 1]
        score = pair_score(verdict(first), verdict(second))
        if score is None:
            counts["invalid"] += 1
        else:
            scores.append(score)
            counts["wins" if score > 0.5 else "losses" if score < 0.5 else "ties"] += 1
        records.append({"question": pair.question, "tuned": pair.tuned, "base": pair.base, "score": score,
                        "orders": [{"order": prompts[2 * k + j][1], "judge_prompt": prompts[2 * k + j][2],
                                    "reply": r, "verdict": verdict(r)} for j, r in enumerate((first, second))]})
    rate, interval = win_rate(scores)
    return {"judge": identity, "pairs": len(pairs), **counts, "win_rate": rate, "win_rate_ci95": interval}, records


def open_judge(spec, project) -> tuple[object, str, int]:
    """(judge, identity, concurrency) for recipe `evaluate.judge`: a GGUF file run in process, one
    pair at a time, or a served model, params.yaml `endpoints.concurrency` at once."""
    endpoints = project.params.endpoints
    if spec.gguf:
        path = project.root / spec.gguf
        if not path.is_file():
            raise StageError(f"evaluate.judge.gguf: {spec.gguf} is not a file")
        return GgufJudge(path), f"gguf:{hash_file(path)}", 1
    key = api_key(project, "evaluate.judge")
    served = spec.openai
    identity = f"openai:{served.model}" + (f"@{served.revision}" if served.revision else "")
    judge = OpenAIJudge(served.base_url, served.model, key, endpoints.timeout_s, endpoints.retries)
    return judge, identity, endpoints.concurrency


def judge_answers(spec, project, records: list[dict], base_answers: Path) -> tuple[dict, dict, list[dict]]:
    """The pairwise judge of a file's answers (`records`) against the base model's (`base_answers`,
    eval@base's answers.jsonl; none when it is missing): the metrics, the verdict cache's counts,
    and a record per pair with every judge prompt and raw reply (judge.jsonl). Verdicts are cached
    by judge and judge prompt (the question and both answers), whichever file gave the answers."""
    base_records = [record for _, record in read_jsonl(base_answers)] if base_answers.is_file() else []
    pairs = [Pair(t["prompt"], t["text"], b["text"]) for t, b in zip(records, base_records)
             if t["prompt"] == b["prompt"]]
    judge, identity, concurrency = open_judge(spec, project)
    cache = ItemCache(project.cache_dir / "eval-items.sqlite", identity)
    try:
        metrics, judged = judge_pairs(judge, identity, pairs, cache, concurrency)
    finally:
        judge.close()
        cache.close()
    return metrics, {"hits": cache.hits, "computed": cache.misses}, judged

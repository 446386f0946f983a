"""Verifiable instruction-following checks, in the style of IFEval, fully offline.

`evaluate.prompts` is a JSONL file; each line holds a `prompt` (the user message) and a list of
`constraints`, each an object naming its `check` and that check's arguments:

    {"prompt": "List three uses of salt, lowercase only.",
     "constraints": [{"check": "bullets", "count": 3}, {"check": "lowercase"}]}

Checks (arguments in brackets):
- `json`: the whole answer parses as JSON (a fenced ```json block is accepted);
- `words` [min, max]: the word count is within the bounds (either may be left out);
- `sentences` [min, max]: the same for sentences (split after . ! ? followed by a space or the end);
- `include` [keywords]: every keyword appears (case-insensitive, whole words);
- `exclude` [keywords]: none appears;
- `lowercase`: no uppercase letter;
- `bullets` [count]: exactly `count` lines start with `* `, `- ` or `+ ` (markdown bullets);
- `ends_with` [phrase]: the answer ends with the phrase (trailing whitespace ignored);
- `stops`: generation ended at the template's end-of-turn marker (`<|im_end|>`) within max_tokens;
  ending at EOS, or at another token llama.cpp stops on, does not pass (`stopped_at` in
  builder/evaluate/answers.py says where). Every prompt also gets this check implicitly.

Strict: the check on the answer as generated. Loose (as IFEval's): the check passes on any of the
answer's variants with its first line, its last line, or both removed, and with markdown `*`
removed, which forgives a preamble ("Sure, here is ...") or a sign-off the check did not ask about.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from builder.errors import DataError
from builder.files import read_jsonl

_WORD = re.compile(r"\b\w+\b", re.UNICODE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_BULLET = re.compile(r"^\s*[*+-]\s+\S", re.MULTILINE)
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```\s*$", re.DOTALL)


def _bounds(value: int, spec: dict) -> bool:
    return spec.get("min", 0) <= value <= spec.get("max", float("inf"))


def _words(text: str) -> int:
    return len(_WORD.findall(text))


def _sentences(text: str) -> int:
    return len([part for part in _SENTENCE_SPLIT.split(text.strip()) if part.strip()])


def _is_json(text: str) -> bool:
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        json.loads(fenced.group(1) if fenced else body)
    except ValueError:
        return False
    return True


def _has(text: str, keyword: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(keyword.lower())}(?!\w)", text.lower()) is not None


CHECKS = {
    "json": lambda text, spec: _is_json(text),
    "words": lambda text, spec: _bounds(_words(text), spec),
    "sentences": lambda text, spec: _bounds(_sentences(text), spec),
    "include": lambda text, spec: all(_has(text, k) for k in spec["keywords"]),
    "exclude": lambda text, spec: not any(_has(text, k) for k in spec["keywords"]),
    "lowercase": lambda text, spec: text == text.lower(),
    "bullets": lambda text, spec: len(_BULLET.findall(text)) == spec["count"],
    "ends_with": lambda text, spec: text.rstrip().endswith(spec["phrase"].rstrip()),
}
ARGUMENTS = {"json": set(), "words": {"min", "max"}, "sentences": {"min", "max"}, "include": {"keywords"},
             "exclude": {"keywords"}, "lowercase": set(), "bullets": {"count"}, "ends_with": {"phrase"},
             "stops": set()}
REQUIRED = {"include": {"keywords"}, "exclude": {"keywords"}, "bullets": {"count"}, "ends_with": {"phrase"}}


@dataclass(frozen=True)
class Prompt:
    prompt: str
    constraints: tuple[dict, ...]


def read_prompts(path: Path, shown: str) -> list[Prompt]:
    """The prompts file, every line checked: a DataError `SHOWN:LINE: what was wrong` names the
    first bad line (`shown` is the path as the recipe writes it)."""
    prompts = []
    for number, row in read_jsonl(path, shown):
        where = f"{shown}:{number}"
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{where}: needs a non-empty string `prompt`")
        constraints = row.get("constraints", [])
        if not isinstance(constraints, list):
            raise DataError(f"{where}: `constraints` must be a list of objects")
        for c in constraints:
            _check_constraint(c, where)
        prompts.append(Prompt(row["prompt"], tuple(constraints)))
    if not prompts:
        raise DataError(f"{shown}: holds no prompt (evaluate.prompts needs at least one)")
    return prompts


def _check_constraint(constraint: object, where: str) -> None:
    if not isinstance(constraint, dict) or constraint.get("check") not in ARGUMENTS:
        raise DataError(f"{where}: each constraint is an object with `check` one of {', '.join(sorted(ARGUMENTS))}; "
                        f"got {json.dumps(constraint)[:80]}")
    name = constraint["check"]
    given = set(constraint) - {"check"}
    if given - ARGUMENTS[name]:
        raise DataError(f"{where}: check `{name}` takes {sorted(ARGUMENTS[name]) or 'no arguments'}, "
                        f"not {sorted(given - ARGUMENTS[name])}")
    if REQUIRED.get(name, set()) - given:
        raise DataError(f"{where}: check `{name}` needs {sorted(REQUIRED[name] - given)}")
    if "keywords" in given and not (isinstance(constraint["keywords"], list) and constraint["keywords"]
                                    and all(isinstance(k, str) and k for k in constraint["keywords"])):
        raise DataError(f"{where}: `keywords` must be a non-empty list of strings")
    for bound in ("min", "max", "count"):
        if bound in given and not (isinstance(constraint[bound], int) and constraint[bound] >= 0):
            raise DataError(f"{where}: `{bound}` must be a non-negative integer")


def loose_variants(text: str) -> list[str]:
    """The answer, without its first line, its last line or both, each with and without markdown `*`."""
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [c.replace("*", "") for c in cut]


def passes(constraint: dict, text: str, stopped: bool) -> tuple[bool, bool]:
    """(strict, loose) verdicts of one constraint on one answer (`stopped`: it ended at the
    end-of-turn marker); an empty answer (or variant) follows no instruction, as in IFEval."""
    if constraint["check"] == "stops":
        return stopped, stopped
    check = CHECKS[constraint["check"]]
    strict = bool(text.strip()) and check(text, constraint)
    return strict, strict or any(v.strip() and check(v, constraint) for v in loose_variants(text)[1:])


def rate(values: list) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def verdicts(prompt: Prompt, text: str, stopped: bool) -> list[tuple[str, bool, bool]]:
    """(check, strict, loose) for each of the prompt's constraints and the implicit `stops`."""
    constraints = (*prompt.constraints, {"check": "stops"})
    return [(c["check"], *passes(c, text, stopped)) for c in constraints]


def score(prompts: list[Prompt], answers: list[tuple[str, bool]]) -> dict:
    """Pass rates over (answer text, stopped at end-of-turn) per prompt: per prompt (every
    constraint met) and per constraint, strict and loose, overall and per check."""
    per_check: dict[str, list[tuple[bool, bool]]] = {}
    whole = []
    for prompt, (text, stopped) in zip(prompts, answers):
        found = verdicts(prompt, text, stopped)
        for name, strict, loose in found:
            per_check.setdefault(name, []).append((strict, loose))
        whole.append((all(v[1] for v in found), all(v[2] for v in found)))
    every = [v for vs in per_check.values() for v in vs]
    return {
        "prompts": len(prompts),
        "prompt_strict": rate([s for s, _ in whole]),
        "prompt_loose": rate([loose for _, loose in whole]),
        "constraint_strict": rate([s for s, _ in every]),
        "constraint_loose": rate([loose for _, loose in every]),
        "per_check": {name: {"n": len(vs), "strict": rate([s for s, _ in vs]),
                             "loose": rate([loose for _, loose in vs])}
                      for name, vs in sorted(per_check.items())},
    }

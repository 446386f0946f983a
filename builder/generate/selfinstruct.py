"""Self-Instruct (Wang et al., 2023): new tasks from a teacher, bootstrapped from seed tasks.

    result = self_instruct(spec, seed_tasks, ask)   # ask(requests) -> replies, cached by the caller

A round builds `requests_per_round` instruction prompts, each showing `prompt_instructions` tasks
(seed tasks, plus `prompt_generated` generated ones once enough are kept, in a seeded order), and
lets the teacher write the next ones. Each candidate goes through the paper's filters: length in
words, a blacklist of what a text model cannot do (images, files, maps, audio, ...), a start with
punctuation or a non-ASCII character, and ROUGE-L novelty against every seed and kept instruction
(builder/generate/rouge.py: rouge-score's exact decision, indexed). For each kept instruction the teacher
says whether it is a classification task, then writes its instances: input first, or, for a
classification task, output (the class label) first, so the labels are not all one class.

The request stream depends only on the seed tasks, the sampling settings, `seed`, the round size
and the prompt settings: prompts show instructions kept under the paper's filter settings (0.7,
4 to 150 words) whatever the recipe's filters are, so a changed filter re-decides cached replies
instead of asking anew. `count` only says when to stop, so a larger count continues the same
stream. Every rejected candidate is returned with its reason.
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import DataError
from builder.files import read_jsonl
from builder.generate.rouge import NoveltyIndex, rouge_tokens
from builder.hashing import hash_value

PAPER_FILTERS = {"rouge_l_max": 0.7, "min_words": 4, "max_words": 150}
# What a text-only model cannot do or see (the paper's list, with Alpaca's additions).
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "videos", "audio", "music", "flowchart", "diagram", "diagrams")
_BLACKLIST = re.compile(r"\b(" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b")
MAX_INSTANCES = 5  # per task, as the paper's instance prompts ask for at most a handful
MAX_OUTPUT_WORDS = 350
CLASSIFY_EXAMPLES = 6
INSTANCE_EXAMPLES = 3

INSTRUCTION_PROMPT = ("Here is a numbered list of tasks that a text-only assistant can do. Continue it with new "
                      "tasks that differ from these in topic and in the kind of work they ask for, one task per "
                      "line, each starting with its number as \"Task N:\".\n\n{tasks}\nTask {next}:")
CLASSIFY_PROMPT = ("For each task, say whether it is a classification task: one whose answer is one label out of "
                   "a small, fixed set of labels. Answer Yes or No.\n\n{examples}\nTask: {instruction}\n"
                   "Is it classification?")
INPUT_FIRST_PROMPT = ("Write examples for the task below, as in the examples before it. An example is an input "
                      "(leave the input out when the task needs none) and the output a careful assistant would "
                      "give. Write up to {limit} examples.\n\n{examples}\nTask: {instruction}\n")
OUTPUT_FIRST_PROMPT = ("The task below is a classification task. For each class label it can have, write the "
                       "label first, then an input of that class, as in the examples before it. Write up to "
                       "{limit} examples.\n\n{examples}\nTask: {instruction}\n")


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]  # (input, output)
    is_classification: bool


@dataclass(frozen=True)
class Request:
    kind: str  # instruction | classify | instances
    prompt: str
    seed: int


@dataclass
class Result:
    tasks: list[dict] = field(default_factory=list)     # generated.jsonl rows, in the order kept
    rejects: list[dict] = field(default_factory=list)   # rejects.jsonl rows
    requests: dict = field(default_factory=lambda: {"instruction": 0, "classify": 0, "instances": 0})
    candidates: int = 0
    rounds: int = 0
    comparisons: int = 0  # exact ROUGE-L computations the index could not rule out
    surplus: int = 0  # instructions kept beyond count in the last round (a larger count uses them)
    unclear: int = 0  # classification replies with neither Yes nor No (taken as No)


def request_seed(*parts: object) -> int:
    """A request's sampling seed, from what identifies it (stable across processes and machines)."""
    return int(hash_value(parts)[:8], 16) & 0x7FFFFFFF


def normalize(text: str) -> str:
    """One line, single spaces, first letter upper-case (as the paper stores instructions)."""
    text = re.sub(r"\s+", " ", text).strip()
    return text[:1].upper() + text[1:]


class InstructionFilter:
    """The paper's instruction filters; `check` returns None (and indexes the instruction) or
    (reason, detail). Seeds are indexed first: a copy of a seed task is not new."""

    def __init__(self, seeds: list[str], rouge_l_max: float, min_words: int, max_words: int):
        self.min_words, self.max_words = min_words, max_words
        seed_tokens = [rouge_tokens(s) for s in seeds]
        self.index = NoveltyIndex(rouge_l_max, seed_tokens)
        self.texts: list[str] = []
        for text, tokens in zip(seeds, seed_tokens):
            self._add(text, tokens)

    def _add(self, text: str, tokens: list[str]) -> None:
        self.index.add(tokens, len(self.texts))
        self.texts.append(text)

    def check(self, text: str) -> tuple[str, str] | None:
        words = len(text.split())
        if not text:
            return "empty", "the teacher wrote an empty task"
        if words < self.min_words:
            return "too_short", f"{words} words (min_words {self.min_words})"
        if words > self.max_words:
            return "too_long", f"{words} words (max_words {self.max_words})"
        hit = _BLACKLIST.search(text.lower())
        if hit:
            return "blacklisted", f"'{hit.group(1)}': a text-only model cannot do or see that"
        if text[0] in string.punctuation:
            return "starts_with_punctuation", f"starts with {text[0]!r}"
        if not text[0].isascii():
            return "non_ascii_start", f"starts with {text[0]!r}"
        tokens = rouge_tokens(text)
        score, twin = self.index.most_similar(tokens)
        if score is not None:
            return "rouge_l", f"ROUGE-L {score:.3f} with: {self.texts[twin]}"
        self._add(text, tokens)
        return None


# Parsing -------------------------------------------------------------------------------------------------

# A task starts at "Task 9:", at "9. Instruction:" (Alpaca's numbered format) or at "Instruction:".
_TASK_MARK = re.compile(r"^[ \t*#]*(?:task[ \t]*\d+[ \t]*[:.)]|(?:\d+[ \t]*[.)][ \t]*)?instruction[ \t]*:)[ \t*]*",
                        re.IGNORECASE | re.MULTILINE)
_NUMBER_MARK = re.compile(r"^[ \t]*(\d+)[ \t]*[.)][ \t]+", re.MULTILINE)
_FIELD_MARK = re.compile(r"^[ \t*]*(?:\d+[ \t]*[.)][ \t]*)?(input|output|class[ \t]*label|label)[ \t*]*:[ \t*]*",
                         re.IGNORECASE | re.MULTILINE)
_EXAMPLE_LINE = re.compile(r"^[ \t*#]*example[ \t]*\d*[ \t]*[:.]?[ \t*]*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Candidate:
    instruction: str
    instances: tuple[tuple[str, str], ...]  # written by the teacher along with the task, if it did
    cut: bool  # the last task of a reply that max_tokens stopped


def parse_instructions(text: str, truncated: bool) -> list[Candidate]:
    """The tasks a reply to an instruction prompt writes. The reply continues "Task N:": its text
    before the first "Task M:" is task N; a reply that numbers a plain list ("10. ...") is split
    at its numbers; a reply with neither is one task. A task followed by "Input:"/"Output:" lines
    (or written in Alpaca's "N. Instruction: / N. Input: / N. Output:" blocks) brings its instance."""
    marks = list(_TASK_MARK.finditer(text)) or list(_NUMBER_MARK.finditer(text))
    pieces = [text[:marks[0].start()] if marks else text]
    pieces += [text[m.end():(marks[k + 1].start() if k + 1 < len(marks) else len(text))] for k, m in enumerate(marks)]
    tasks = []
    for piece in pieces:
        piece = re.split(r"^[ \t]*#{3,}", piece, maxsplit=1, flags=re.MULTILINE)[0]
        field = _FIELD_MARK.search(piece)
        head = piece[:field.start()] if field else piece
        given = tuple(parse_instances(piece[field.start():], False)) if field else ()
        tasks.append((normalize(head.split("\n\n")[0]), given))
    if not tasks[0][0] and not tasks[0][1]:  # nothing before the first mark: the reply began with a mark
        tasks.pop(0)
    return [Candidate(t, instances, truncated and k == len(tasks) - 1) for k, (t, instances) in enumerate(tasks)]


def _fields(text: str) -> list[tuple[str, str]]:
    """(field, value) in order: input, output or label, each value up to the next field."""
    text = _EXAMPLE_LINE.sub("", text)
    marks = list(_FIELD_MARK.finditer(text))
    out = []
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        name = m.group(1).lower().replace(" ", "").replace("\t", "")
        out.append(("label" if name in ("classlabel", "label") else name, text[m.end():end].strip()))
    return out


def parse_instances(text: str, classification: bool, truncated: bool = False) -> list[tuple[str, str]]:
    """(input, output) pairs from a reply to an instance prompt; the reply stops at a new "Task:".
    Input-first: an output closes an instance (with the input before it, if any); a reply with no
    field names is one output (not for a classification task: a label needs its field). Output-
    first: a label, then the input of that class (a reply written input-first is read that way).
    The last instance of a reply that max_tokens cut off is dropped."""
    instances = _instances(text, classification)
    return instances[:-1] if truncated else instances


def _instances(text: str, classification: bool) -> list[tuple[str, str]]:
    text = re.split(r"^[ \t*#]*task[ \t]*\d*[ \t]*:", text, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)[0]
    fields, instances, pending = _fields(text), [], None
    if classification and any(name == "label" for name, _ in fields):
        for name, value in fields:
            if name == "label":
                pending = value
            elif name == "input" and pending is not None:
                instances.append((value, pending))
                pending = None
    elif fields:  # input first (a classification reply without labels too: its outputs are the labels)
        for name, value in fields:
            if name == "input":
                pending = value
            elif name == "output":
                instances.append((pending or "", value))
                pending = None
    elif text.strip() and not classification:
        instances.append(("", text.strip()))
    return instances


def check_instances(instruction: str, pairs: list[tuple[str, str]]) -> tuple[list[dict], list[str]]:
    """The usable instances (the paper's rules: an output, not a copy of the input, not overlong; no
    repeats; a classification input) and why each other one was dropped."""
    kept, dropped, seen = [], [], set()
    for given, output in pairs:
        given, output = given.strip(), output.strip()
        if given.lower() in ("", "none", "n/a", "null", "<noinput>", "no input"):
            given = ""
        problem = ("empty output" if not output else "output repeats the input" if output == given
                   else "output repeats the instruction" if output == instruction
                   else f"output over {MAX_OUTPUT_WORDS} words" if len(output.split()) > MAX_OUTPUT_WORDS
                   else "repeated instance" if (given, output) in seen else None)
        if problem:
            dropped.append(problem)
            continue
        seen.add((given, output))
        kept.append({"input": given, "output": output})
    return kept[:MAX_INSTANCES], dropped


def classification_answer(reply: str) -> bool | None:
    """True for a Yes, False for a No (its first word that is either), None for neither."""
    word = re.search(r"\b(yes|no)\b", reply.lower())
    return None if word is None else word.group(1) == "yes"



# Prompts -------------------------------------------------------------------------------------------------

def instruction_prompt(spec, seeds: list[SeedTask], pool: list[str], rng: random.Random) -> str:
    generated = rng.sample(pool, min(spec.prompt_generated, len(pool)))
    sampled = rng.sample(seeds, min(len(seeds), spec.prompt_instructions - len(generated)))
    shown = generated + [s.instruction for s in sampled]
    rng.shuffle(shown)
    tasks = "\n".join(f"Task {k}: {normalize(t)}" for k, t in enumerate(shown, start=1))
    return INSTRUCTION_PROMPT.format(tasks=tasks, next=len(shown) + 1)


def classify_prompt(seeds: list[SeedTask], instruction: str, rng: random.Random) -> str:
    yes = [s for s in seeds if s.is_classification]
    no = [s for s in seeds if not s.is_classification]
    half = CLASSIFY_EXAMPLES // 2
    shown = rng.sample(yes, min(half, len(yes))) + rng.sample(no, min(CLASSIFY_EXAMPLES - min(half, len(yes)), len(no)))
    rng.shuffle(shown)
    examples = "".join(f"Task: {normalize(s.instruction)}\n"
                       f"Is it classification? {'Yes' if s.is_classification else 'No'}\n\n" for s in shown)
    return CLASSIFY_PROMPT.format(examples=examples, instruction=instruction)


def instance_prompt(seeds: list[SeedTask], instruction: str, classification: bool, rng: random.Random) -> str:
    alike = [s for s in seeds if s.is_classification == classification] or seeds
    blocks = []
    for seed in rng.sample(alike, min(INSTANCE_EXAMPLES, len(alike))):
        lines = [f"Task: {normalize(seed.instruction)}"]
        for given, output in seed.instances[:2]:
            if classification:
                lines += [f"Class label: {output}", f"Input: {given}"]
            else:
                lines += ([f"Input: {given}"] if given else []) + [f"Output: {output}"]
        blocks.append("\n".join(lines) + "\n\n")
    template = OUTPUT_FIRST_PROMPT if classification else INPUT_FIRST_PROMPT
    return template.format(examples="".join(blocks), instruction=instruction, limit=MAX_INSTANCES)


# The loop ------------------------------------------------------------------------------------------------

def self_instruct(spec, seeds: list[SeedTask], ask, progress=None) -> Result:
    """Rounds of instruction prompts until `spec.count` tasks are kept or `spec.request_cap`
    instruction requests are spent. `ask(requests)` returns one reply (text, finish_reason) per
    request, in order; the caller caches and parallelises. `progress(kept)` is told each round."""
    texts = [normalize(s.instruction) for s in seeds]
    ours = {"rouge_l_max": spec.rouge_l_max, "min_words": spec.min_words, "max_words": spec.max_words}
    pool_filter = InstructionFilter(texts, **PAPER_FILTERS)  # decides what prompts show
    keep_filter = pool_filter if ours == PAPER_FILTERS else InstructionFilter(texts, **ours)
    pool: list[str] = []
    result = Result()
    while len(result.tasks) < spec.count and result.requests["instruction"] < spec.request_cap:
        n = min(spec.requests_per_round, spec.request_cap - result.requests["instruction"])
        requests = [Request("instruction",
                            instruction_prompt(spec, seeds, pool, random.Random(f"{spec.seed}:{result.rounds}:{i}")),
                            request_seed(spec.seed, "instruction", result.rounds, i)) for i in range(n)]
        fresh = []
        for i, reply in enumerate(ask(requests)):
            for candidate in parse_instructions(reply["text"], reply["finish_reason"] == "length"):
                result.candidates += 1
                text = candidate.instruction
                where = {"instruction": text, "round": result.rounds, "request": i}
                if candidate.cut:
                    result.rejects.append({**where, "reason": "truncated", "detail": "cut off by sampling.max_tokens"})
                    continue
                verdict = pool_filter.check(text)
                if verdict is None:
                    pool.append(text)
                if keep_filter is not pool_filter:
                    verdict = keep_filter.check(text)
                if verdict is None:
                    fresh.append((where, candidate.instances))
                else:
                    result.rejects.append({**where, "reason": verdict[0], "detail": verdict[1]})
        result.requests["instruction"] += n
        while fresh and len(result.tasks) < spec.count:  # instances only for as many as count still needs
            needed = spec.count - len(result.tasks)
            _add_instances(seeds, spec.seed, fresh[:needed], ask, result)
            fresh = fresh[needed:]
        result.surplus += len(fresh)
        result.rounds += 1
        if progress is not None:
            progress(min(len(result.tasks), spec.count))
    result.comparisons = pool_filter.index.comparisons + (
        keep_filter.index.comparisons if keep_filter is not pool_filter else 0)
    return result


def _add_instances(seeds: list[SeedTask], seed: int, fresh: list[tuple[dict, tuple]], ask, result: Result) -> None:
    """Classify each newly kept instruction, then ask for its instances (output-first for
    classification) unless the teacher wrote them with the task; tasks with a usable instance are
    kept, in the order their instructions were."""
    rngs = [random.Random(f"{seed}:{w['instruction']}") for w, _ in fresh]  # prompts depend on the instruction only
    classify = [Request("classify", classify_prompt(seeds, w["instruction"], rng),
                        request_seed(seed, "classify", w["instruction"])) for (w, _), rng in zip(fresh, rngs)]
    answers = [classification_answer(r["text"]) for r in ask(classify)]
    labels = [bool(a) for a in answers]
    result.unclear += answers.count(None)
    result.requests["classify"] += len(classify)
    writes = [Request("instances", instance_prompt(seeds, w["instruction"], label, rng),
                      request_seed(seed, "instances", w["instruction"], label))
              for (w, given), label, rng in zip(fresh, labels, rngs) if not given]
    replies = iter(ask(writes))
    result.requests["instances"] += len(writes)
    for (where, given), label in zip(fresh, labels):
        if given:
            pairs = list(given)
        else:
            reply = next(replies)
            pairs = parse_instances(reply["text"], label, truncated=reply["finish_reason"] == "length")
        instances, dropped = check_instances(where["instruction"], pairs)
        if instances:
            result.tasks.append({"instruction": where["instruction"], "instances": instances,
                                 "is_classification": label})
        else:
            why = "; ".join(sorted(set(dropped))) or "the reply has no " + ("'Class label:' then 'Input:'" if label
                                                                             else "'Output:' (nor any text)")
            result.rejects.append({**where, "reason": "no_instances", "detail": why})


def read_seed_tasks(path: Path) -> list[SeedTask]:
    """Seed tasks from a Self-Instruct .jsonl; a bad line raises DataError `FILE:LINE: ...`."""
    seeds = []
    for number, row in read_jsonl(path):
        try:
            instruction = row["instruction"]
            instances = tuple((str(i.get("input") or ""), str(i["output"])) for i in row.get("instances") or ())
            if not isinstance(instruction, str) or not instruction.strip():
                raise ValueError("an empty instruction")
            seeds.append(SeedTask(instruction, instances, bool(row.get("is_classification", False))))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{path}:{number}: not a Self-Instruct seed task ({type(exc).__name__}: {exc}); "
                            "expected {\"instruction\": ..., \"instances\": [{\"input\": ..., \"output\": ...}], "
                            "\"is_classification\": true|false}") from None
    if len(seeds) < 2:
        raise DataError(f"{path}: {len(seeds)} seed task(s); Self-Instruct needs at least 2 to sample prompts from")
    return seeds

"""The instruction-following checks (builder/evaluate/ifeval.py): each checker, strict and loose, and the
prompts file."""
import json

import pytest
from helpers import REPO

from builder.errors import DataError
from builder.evaluate.ifeval import ARGUMENTS, Prompt, passes, read_prompts, score


@pytest.mark.parametrize("constraint, text, strict, loose", [
    ({"check": "json"}, '{"city": "Paris"}', True, True),
    ({"check": "json"}, '```json\n["a", "b"]\n```', True, True),
    ({"check": "json"}, 'Sure! Here it is:\n{"a": 1}', False, True),
    ({"check": "json"}, "not json", False, False),
    ({"check": "words", "max": 3}, "one two three", True, True),
    ({"check": "words", "min": 4}, "one two three", False, False),
    ({"check": "sentences", "max": 1}, "One sentence. Two sentences.", False, False),
    ({"check": "sentences", "max": 1}, "Sure.\nOne sentence.", False, True),
    ({"check": "sentences", "min": 2, "max": 2}, "It rains! Take a coat.", True, True),
    ({"check": "include", "keywords": ["Tokyo"]}, "The capital is tokyo.", True, True),
    ({"check": "include", "keywords": ["cat"]}, "concatenate", False, False),
    ({"check": "exclude", "keywords": ["useless"]}, "This is not helpful.", True, True),
    ({"check": "exclude", "keywords": ["useless"]}, "Useless app.", False, False),
    ({"check": "lowercase"}, "spam", True, True),
    ({"check": "lowercase"}, "Spam", False, False),
    ({"check": "bullets", "count": 2}, "* red\n* blue", True, True),
    ({"check": "bullets", "count": 2}, "- red\n- blue\n- green", False, True),  # loose: a line less
    ({"check": "bullets", "count": 2}, "+ red", False, False),
    ({"check": "ends_with", "phrase": "That is all."}, "Tokyo. That is all.  \n", True, True),
    ({"check": "ends_with", "phrase": "That is all."}, "Tokyo. That is all.\nHope this helps!", False, True),
    ({"check": "exclude", "keywords": ["x"]}, "   ", False, False),  # an empty answer follows nothing
    ({"check": "lowercase"}, "Sure:\n", False, False),  # nor does an empty loose variant
])
def test_checks_strict_and_loose(constraint, text, strict, loose):
    assert passes(constraint, text, stopped=True) == (strict, loose)


def test_score_counts_prompts_constraints_and_the_implicit_stop():
    prompts = [Prompt("a", ({"check": "lowercase"},)), Prompt("b", ({"check": "json"}, {"check": "words", "max": 2}))]
    result = score(prompts, [("fine", True), ('{"a": 1}', False)])
    assert result["prompts"] == 2 and result["prompt_strict"] == 0.5  # the second did not stop
    assert result["per_check"]["stops"] == {"n": 2, "strict": 0.5, "loose": 0.5}
    assert result["constraint_strict"] == round(4 / 5, 4)


@pytest.mark.parametrize("line, message", [
    ("{", "not JSON: Expecting property name enclosed in double quotes at column 2"),
    (json.dumps({"constraints": []}), "non-empty string `prompt`"),
    (json.dumps({"prompt": "p", "constraints": [{"check": "shout"}]}), "`check` one of"),
    (json.dumps({"prompt": "p", "constraints": [{"check": "bullets"}]}), "needs ['count']"),
    (json.dumps({"prompt": "p", "constraints": [{"check": "words", "most": 3}]}), "not ['most']"),
    (json.dumps({"prompt": "p", "constraints": [{"check": "words", "max": -1}]}), "non-negative integer"),
])
def test_bad_prompt_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    with pytest.raises(DataError) as info:
        read_prompts(path, "p.jsonl")
    assert str(info.value).startswith("p.jsonl:2: ") and message in str(info.value)


def test_a_prompts_file_without_prompts_or_that_cannot_be_read_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="^empty.jsonl: holds no prompt"):
        read_prompts(tmp_path / "empty.jsonl", "empty.jsonl")
    with pytest.raises(DataError, match="^missing.jsonl: cannot read: No such file or directory$"):
        read_prompts(tmp_path / "missing.jsonl", "missing.jsonl")


def test_the_demo_prompts_file_is_valid():
    prompts = read_prompts(REPO / "data" / "demo_prompts.jsonl", "demo_prompts.jsonl")
    assert len(prompts) == 12 and all(p.constraints for p in prompts)
    assert sum(len(p.constraints) for p in prompts) == 22
    assert sorted({c["check"] for p in prompts for c in p.constraints}) == sorted(set(ARGUMENTS) - {"stops"})

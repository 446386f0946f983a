"""builder/data/formats.py: each `format:` adapter turns a row into exact turns, or refuses it with
a countable reason and a detail; `fields:` renames columns before the adapter reads them."""
from __future__ import annotations

import pytest

from builder.data.formats import FORMATS, apply_fields
from builder.data.records import REJECTED, RowError
from builder.recipe.schema import FORMAT_NAMES


def refusal(fmt: str, row: dict) -> tuple[str, str]:
    with pytest.raises(RowError) as caught:
        FORMATS[fmt](row)
    return caught.value.reason, caught.value.detail


def test_the_registry_is_the_schemas_list_of_format_names():
    assert sorted(FORMATS) == sorted(FORMAT_NAMES)


def test_alpaca_joins_input_to_the_instruction_and_keeps_a_system_message():
    assert FORMATS["alpaca"]({"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be exact."}) == [
        [("system", "Be exact."), ("user", "Add.\n\n2 and 3"), ("assistant", "5")]]
    assert FORMATS["alpaca"]({"instruction": "Hi.", "input": "  ", "output": "Hello.", "system": ""}) == [
        [("user", "Hi."), ("assistant", "Hello.")]]
    assert refusal("alpaca", {"instruction": "Hi.", "extra": 1}) == (
        "missing_field", "no 'output' field (row has: extra, instruction)")
    assert refusal("alpaca", {"instruction": "Hi.", "output": None}) == ("missing_field", "'output' is null")
    assert refusal("alpaca", {"instruction": 3, "output": "x"}) == ("bad_type", "'instruction' is int, expected text")
    assert refusal("alpaca", {}) == ("missing_field", "no 'instruction' field (row has: no fields)")


def test_sharegpt_maps_roles_and_refuses_unknown_ones():
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"}
    assert FORMATS["sharegpt"](row) == [[("system", "S"), ("user", "q"), ("assistant", "a")]]
    assert refusal("sharegpt", {"conversations": "q"}) == ("bad_type", "'conversations' is not a list")
    assert refusal("sharegpt", {"conversations": [{"from": "human"}]}) == (
        "bad_turn", "turn 0 is not an object with 'from' and 'value'")
    assert refusal("sharegpt", {"conversations": [{"from": "bot", "value": "q"}]}) == (
        "bad_role", "turn 0 is from 'bot'; allowed: human, user, gpt, assistant, system")


def test_messages_and_prompt_completion():
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert FORMATS["messages"]({"messages": messages}) == [[("user", "u"), ("assistant", "a")]]
    assert refusal("messages", {"messages": [{"role": "user"}]}) == ("bad_turn", "a message has no 'content'")
    assert refusal("messages", {"messages": ["u"]}) == ("bad_type", "'messages' is not a list of objects")
    assert FORMATS["prompt_completion"]({"prompt": "Why?", "completion": "Because."}) == [
        [("user", "Why?"), ("assistant", "Because.")]]


def test_preference_rows_carry_the_rejected_answer_last():
    row = {"prompt": [{"role": "user", "content": "Pick."}],
           "chosen": [{"role": "user", "content": "Pick."}, {"role": "assistant", "content": "Blue."}],
           "rejected": {"role": "assistant", "content": "Dunno."}}
    assert FORMATS["preference"](row) == [[("user", "Pick."), ("assistant", "Blue."), (REJECTED, "Dunno.")]]
    assert refusal("preference", {"prompt": "Q", "chosen": " A ", "rejected": "A"}) == (
        "same_answers", "'chosen' and 'rejected' are the same answer")
    assert refusal("preference", {"prompt": "Q", "chosen": "A", "rejected": " "}) == (
        "empty_response", "'rejected' is empty")
    assert refusal("preference", {"prompt": "Q", "chosen": {"role": "user", "content": "A"}, "rejected": "B"}) == (
        "bad_role", "'chosen' ends with a 'user' message, expected assistant")
    assert refusal("preference", {"prompt": 1, "chosen": "A", "rejected": "B"}) == (
        "bad_type", "'prompt' is neither text nor a list of {role, content} messages")


def test_self_instruct_gives_one_conversation_per_instance():
    row = {"instruction": "Classify.", "instances": [{"input": "good", "output": "positive"}, {"output": "neutral"}]}
    assert FORMATS["self_instruct"](row) == [[("user", "Classify.\n\ngood"), ("assistant", "positive")],
                                             [("user", "Classify."), ("assistant", "neutral")]]
    assert refusal("self_instruct", {"instruction": "x", "instances": []}) == (
        "bad_type", "'instances' is not a non-empty list")
    assert refusal("self_instruct", {"instruction": "x", "instances": ["y"]}) == (
        "bad_type", "an instance is not an object")


def test_apply_fields_renames_the_mapped_columns_only():
    row = {"q": "Why?", "a": "Because.", "output": "shadowed", "id": 7}
    assert apply_fields(row, {"instruction": "q", "output": "a"}) == {
        "instruction": "Why?", "output": "Because.", "id": 7}
    assert apply_fields(row, {}) is row
    assert apply_fields({"q": "Why?"}, {"instruction": "q", "output": "a"}) == {"instruction": "Why?"}

"""builder/files.py: one JSON/JSONL reader with one error wording (FILE:LINE: what was wrong), and
writers that give the same bytes for the same value and never leave half a file."""
from __future__ import annotations

import os

import pytest

from builder.errors import FileFormatError
from builder.files import (
    LineProblem,
    parse_json,
    parse_jsonl,
    read_json,
    read_jsonl,
    read_text,
    write_atomic,
    write_json,
    write_jsonl,
)


def message(call) -> str:
    with pytest.raises(FileFormatError) as caught:
        call()
    return str(caught.value)


def test_parse_jsonl_numbers_lines_skips_blanks_and_puts_problems_in_place():
    lines = [b'{"a": 1}\n', b"\n", b"  \r\n", b'[1, 2]\n', b'{"a": \n', b"caf\xe9\n", b'"x" y\n', '{"s": "\u00e9"}']
    assert list(parse_jsonl(lines, first=10)) == [
        (10, {"a": 1}), (13, [1, 2]),
        (14, LineProblem("bad_json", "not JSON: Expecting value at column 7")),  # cut short: its end, not line 2
        (15, LineProblem("bad_encoding", "not UTF-8: byte 0xe9 at column 4")),
        (16, LineProblem("bad_json", "not JSON: Extra data at column 5")),
        (17, {"s": "\u00e9"})]


def test_a_line_problem_names_the_column_within_the_row():
    (_, problem), = parse_jsonl([b'{"a": 1,}\n'])
    assert problem == LineProblem("bad_json", "not JSON: Expecting property name enclosed in double quotes at column 9")


def test_read_jsonl_gives_numbered_values(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n"two"\n3')  # CRLF, a blank line, no final newline
    assert read_jsonl(path) == [(1, {"a": 1}), (3, "two"), (4, 3)]
    path.write_bytes(b"")
    assert read_jsonl(path) == []


@pytest.mark.parametrize("data,expected", [
    (b'{"a": 1}\n{"a": 2\n', "rows.jsonl:2: not JSON: Expecting ',' delimiter at column 8"),
    (b'{"a": 1}\n\n{"b": "\xff"}\n', "rows.jsonl:3: not UTF-8: byte 0xff at column 8"),
    (b"nope\n", "rows.jsonl:1: not JSON: Expecting value at column 1"),
])
def test_read_jsonl_names_file_and_line_of_the_first_bad_line(tmp_path, data, expected):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(data)
    assert message(lambda: read_jsonl(path)) == f"{tmp_path}/{expected}"
    assert message(lambda: read_jsonl(path, shown="rows.jsonl")) == expected


def test_read_json_value_errors_and_default(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{\n  "key": "abc",\n  "n": [1, 2]\n}\n')
    assert read_json(path) == {"key": "abc", "n": [1, 2]}
    path.write_text('{\n  "key": "abc",\n  "n": [1, 2\n}\n')
    assert message(lambda: read_json(path, shown="m.json")) == "m.json:4: not JSON: Expecting ',' delimiter at column 1"
    assert read_json(path, default=None) is None
    path.write_bytes(b'{\n  "k": "caf\xe9"\n}\n')
    assert message(lambda: read_json(path, shown="m.json")) == "m.json:2: not UTF-8: byte 0xe9 at column 12"
    assert read_json(path, default={}) == {}
    missing = tmp_path / "none.json"
    assert message(lambda: read_json(missing)) == f"{missing}: cannot read: No such file or directory"
    assert read_json(missing, default=[]) == []
    assert message(lambda: read_json(tmp_path)) == f"{tmp_path}: cannot read: Is a directory"


def test_read_text_and_parse_json_use_the_same_words(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"one\ntwo \xc3\n")  # a UTF-8 sequence cut short
    assert message(lambda: read_text(path, shown="t.txt")) == "t.txt:2: not UTF-8: byte 0xc3 at column 5"
    path.write_bytes("one\ntw\u00f6\n".encode())
    assert read_text(path) == "one\ntw\u00f6\n"
    assert parse_json('[1,\n 2]', "x.json") == [1, 2]
    assert message(lambda: parse_json('[1,\n 2,\n ]', "x.json")) == "x.json:3: not JSON: Expecting value at column 2"


def test_writers_give_fixed_bytes_and_leave_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "v.json"
    write_json(path, {"b": [1, 2], "a": "\u00e9"})
    assert path.read_bytes() == '{\n "a": "\u00e9",\n "b": [\n  1,\n  2\n ]\n}\n'.encode()
    write_json(path, {"equal": True}, indent=None)
    assert path.read_bytes() == b'{"equal": true}\n'
    rows = tmp_path / "r.jsonl"
    write_jsonl(rows, ({"z": i, "a": "\u00e9"} for i in range(2)))  # any iterable, written line by line
    assert rows.read_bytes() == '{"a": "\u00e9", "z": 0}\n{"a": "\u00e9", "z": 1}\n'.encode()
    assert read_jsonl(rows) == [(1, {"a": "\u00e9", "z": 0}), (2, {"a": "\u00e9", "z": 1})]
    write_atomic(tmp_path / "t.txt", "x")
    assert oct(os.stat(tmp_path / "t.txt").st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["r.jsonl", "sub", "t.txt", "v.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "r.jsonl"
    write_jsonl(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_bytes() == b'{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]

"""`report`: the mixture table and PNG of a dataset build, from the dataset stage's stats.json."""
from __future__ import annotations

import copy
import struct
from pathlib import Path

from builder.data.report import BOLD, DIM, RESET, format_stats_table, ordered_sources, write_mixture_png

# two sources; JSON is written with sort_keys, so the recipe order comes from "order"
STATS = {
    "sources": {
        "chats": {"rows": 40, "conversations": 38, "rejected": {"bad_json": 2, "duplicate": 1}, "malformed": 2,
                  "deduplicated": 1, "filtered": 0, "usable": 37, "eval": 2, "train_pool": 35, "sampled": 500,
                  "tokens": 61000, "trained_tokens": 20500, "mean_tokens": 122.0, "max_tokens": 390},
        "tips": {"rows": 250, "conversations": 245,
                 "rejected": {"bad_json": 2, "duplicate": 3, "near_duplicate": 1, "min_chars": 4, "too_long": 1},
                 "malformed": 5, "deduplicated": 4, "filtered": 5, "usable": 236, "eval": 12, "train_pool": 224,
                 "sampled": 1500, "tokens": 123456, "trained_tokens": 45678, "mean_tokens": 82.3,
                 "max_tokens": 411},
    },
    "order": ["tips", "chats"],
    "train_examples": 2000, "eval_examples": 14, "rejected": 14, "train_tokens": 184456, "trained_tokens": 66178,
    "length_histogram": {"edges": [0, 32, 64, 128, 256, 512],
                         "counts": {"chats": [0, 50, 200, 200, 50], "tips": [100, 400, 700, 250, 50]}},
}
RULE = ("------  ----  --------  -----------  -----  --------"
        "  ------  ----  -------  ----------  -------  -------  ---------  ------------")


def test_table_has_a_row_per_source_in_recipe_order_a_total_and_every_reason():
    # rejected and its top reasons leave out what dedup and filtered count (duplicate, min_chars, ...)
    assert format_stats_table(STATS) == "\n".join([
        "source  rows  rejected  top reasons  dedup  filtered"
        "  usable  eval  sampled  % examples   tokens  trained  % trained  mean/max tok",
        RULE,
        "tips     250         2  bad_json 2       4         5"
        "     236    12    1,500       75.0%  123,456   45,678      69.0%      82.3/411",
        "chats     40         2  bad_json 2       1         0"
        "      37     2      500       25.0%   61,000   20,500      31.0%     122.0/390",
        RULE,
        "total    290         4  bad_json 4       5         5"
        "     273    14    2,000      100.0%  184,456   66,178     100.0%      92.2/411",
        "",
        "rejects by reason:",
        "  tips: min_chars 4, duplicate 3, bad_json 2, near_duplicate 1, too_long 1",
        "  chats: bad_json 2, duplicate 1",
        "",
    ])


def test_a_dropped_row_is_counted_in_one_column_only():
    """rejected (malformed, template refusals), dedup and filtered split the dropped rows: with one
    conversation per row, rows = rejected + dedup + filtered + usable."""
    reasons = {"bad_json": 1, "template_error": 1, "duplicate": 2, "near_duplicate": 1, "min_chars": 1}
    stats = {"sources": {"a": {"rows": 10, "conversations": 9, "rejected": reasons, "malformed": 1,
                               "deduplicated": 3, "filtered": 1, "usable": 4, "eval": 0, "train_pool": 4,
                               "sampled": 4, "tokens": 40, "trained_tokens": 20, "mean_tokens": 10.0,
                               "max_tokens": 12}}}
    lines = format_stats_table(stats).splitlines()
    assert lines[2].split() == ["a", "10", "2", "bad_json", "1,", "template_error", "1", "3", "1", "4", "0", "4",
                                "100.0%", "40", "20", "100.0%", "10.0/12"]
    assert total_row("\n".join(lines))[1:8] == ["10", "2", "bad_json", "1,", "template_error", "1", "3"]
    assert lines[-1] == "  a: duplicate 2, bad_json 1, min_chars 1, near_duplicate 1, template_error 1"


def total_row(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("total")][0].split()


def test_total_row_sums_sources_and_weights_the_mean_by_examples():
    # (82.3 * 1500 + 122.0 * 500) / 2000 = 92.225; max of 411 and 390
    assert total_row(format_stats_table(STATS)) == [
        "total", "290", "4", "bad_json", "4", "5", "5", "273", "14",
        "2,000", "100.0%", "184,456", "66,178", "100.0%", "92.2/411"]


def test_shares_of_examples_and_trained_tokens():
    stats = copy.deepcopy(STATS)
    stats["sources"]["chats"].update(sampled=1000, trained_tokens=1)  # 1500/2500, 45678/45679
    rows = {line.split()[0]: line for line in format_stats_table(stats).splitlines()[2:4]}
    assert " 60.0% " in rows["tips"] and " 100.0% " in rows["tips"]
    assert " 40.0% " in rows["chats"] and " 0.0% " in rows["chats"]


def test_source_with_no_sampled_examples_shows_zero_share_and_no_mean():
    stats = copy.deepcopy(STATS)
    stats["sources"]["chats"].update(sampled=0, tokens=0, trained_tokens=0, mean_tokens=0.0, max_tokens=0)
    text = format_stats_table(stats)
    chats = text.splitlines()[3].split()
    assert chats[0] == "chats" and chats[-6:] == ["0", "0.0%", "0", "0", "0.0%", "-"]
    # the total's mean and max come from the sources that gave examples
    assert total_row(text)[-6:] == ["1,500", "100.0%", "123,456", "45,678", "100.0%", "82.3/411"]
    assert format_stats_table(stats, color=True).splitlines()[3] == f"{DIM}{text.splitlines()[3]}{RESET}"


def test_no_examples_at_all_gives_no_shares():
    stats = copy.deepcopy(STATS)
    for s in stats["sources"].values():
        s.update(sampled=0, tokens=0, trained_tokens=0)
    assert total_row(format_stats_table(stats))[-6:] == ["0", "-", "0", "0", "-", "-"]


def test_old_stats_without_the_new_keys_show_dashes():
    old = {"sources": {"tips": {"conversations": 245, "rejected": {"bad_json": 2}, "usable": 236, "eval": 12,
                                "train_pool": 224, "sampled": 30, "tokens": 900, "trained_tokens": 300},
                       "chats": {"conversations": 38, "rejected": {}, "usable": 37, "eval": 2, "train_pool": 35,
                                 "sampled": 10, "tokens": 100, "trained_tokens": 100}},
           "train_examples": 40, "eval_examples": 14, "rejected": 2, "train_tokens": 1000, "trained_tokens": 400}
    assert format_stats_table(old) == "\n".join([
        "source  rows  rejected  top reasons  dedup  filtered  usable  eval"
        "  sampled  % examples  tokens  trained  % trained  mean/max tok",
        "------  ----  --------  -----------  -----  --------  ------  ----"
        "  -------  ----------  ------  -------  ---------  ------------",
        "tips       -         2  bad_json 2       -         -     236    12"
        "       30       75.0%     900      300      75.0%             -",
        "chats      -         0  -                -         -      37     2"
        "       10       25.0%     100      100      25.0%             -",
        "------  ----  --------  -----------  -----  --------  ------  ----"
        "  -------  ----------  ------  -------  ---------  ------------",
        "total      -         2  bad_json 2       -         -     273    14"
        "       40      100.0%   1,000      400     100.0%             -",
        "",
        "rejects by reason:",
        "  tips: bad_json 2",
        "",
    ])


def test_order_falls_back_to_dict_order_and_ignores_unknown_names():
    assert ordered_sources({"sources": {"b": {}, "a": {}}}) == ["b", "a"]
    assert ordered_sources({"sources": {"b": {}, "a": {}, "c": {}}, "order": ["a", "gone"]}) == ["a", "b", "c"]


def test_colour_marks_header_and_total_only_when_asked():
    plain, painted = format_stats_table(STATS), format_stats_table(STATS, color=True)
    assert "\x1b" not in plain
    assert painted.splitlines()[0] == f"{BOLD}{plain.splitlines()[0]}{RESET}"
    assert painted.splitlines()[5] == f"{BOLD}{plain.splitlines()[5]}{RESET}"
    assert painted.splitlines()[2] == plain.splitlines()[2]


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk, the first chunk after the 8-byte signature."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def test_png_has_both_panels_and_the_same_bytes_every_time(tmp_path):
    first, second = tmp_path / "a" / "mixture.png", tmp_path / "b.png"
    write_mixture_png(STATS, first)
    write_mixture_png(copy.deepcopy(STATS), second)
    data = first.read_bytes()
    assert png_size(data) == (800, 600)
    assert data == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["mixture.png"]  # no temp file left behind

    changed = copy.deepcopy(STATS)
    changed["sources"]["chats"]["sampled"] = 1500
    write_mixture_png(changed, second)
    assert second.read_bytes() != data


def test_png_without_histogram_has_only_the_shares_panel(tmp_path):
    old = copy.deepcopy(STATS)
    del old["length_histogram"], old["order"]
    old["sources"]["chats"].update(sampled=0, tokens=0, trained_tokens=0)
    path = tmp_path / "mixture.png"
    path.write_bytes(b"an older report")  # replaced, not appended to
    write_mixture_png(old, path)
    assert png_size(path.read_bytes()) == (800, 300)
    assert Path(path).read_bytes().endswith(b"IEND\xaeB`\x82")

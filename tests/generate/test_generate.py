"""generate@<source>: Self-Instruct parsing and filters, a canned teacher server on 127.0.0.1 (kept count,
reject reasons, the request cache: rerun, resume after a kill, larger count, new filter), the API key
kept out of files, llama_cpp.server and the in-process GGUF teacher on the tiny model."""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, CannedChat

from builder.errors import DataError, StageError
from builder.generate.selfinstruct import (
    InstructionFilter,
    check_instances,
    classification_answer,
    parse_instances,
    parse_instructions,
    read_seed_tasks,
)

SHARED_SEEDS = REPO.parent / "shared" / "data" / "alpaca_seed_tasks.jsonl"
TOPICS = ["saving money on groceries", "planning a vegetable garden", "training for a first 10k run",
          "writing a cover letter", "keeping houseplants alive", "learning to play chess", "packing for a long flight",
          "baking sourdough bread", "organising a small office", "reducing food waste at home",
          "choosing a used bicycle", "preparing for a job interview", "teaching a dog to sit",
          "making a weekly meal plan", "studying for a history exam", "repairing a flat tyre",
          "hosting a birthday party", "starting a book club", "writing a thank-you note", "cleaning a cast iron pan"]
CLASSIFY_FORM = "Classify this note about {t} as urgent or not urgent."
FORMS = ["Write a short poem about {t}.", "Give three practical tips for {t}.", "Explain {t} to a complete beginner.",
         "List the common mistakes people make when {t}.",
         "Suggest a catchy title for a blog post on {t}.", "Describe a typical day of someone who is {t}."]
BAD = ["Draw a picture of {t}.", "Sing now.", "- {t} in a list", "Écrivez un poème sur {t}.",
       "Watch the video about {t} and summarize it."]


BAD_TURN, FORM_TURN = itertools.count(), itertools.count()


def teacher_reply(prompt: str, rng: random.Random) -> str:
    """What a Self-Instruct teacher writes for each kind of tunefile prompt (tasks, a Yes/No, instances)."""
    if prompt.rstrip().endswith(":") and re.search(r"Task \d+:$", prompt.rstrip()):
        bad = BAD[next(BAD_TURN) % len(BAD)]  # every kind of bad task, in turn
        tasks = [FORMS[next(FORM_TURN) % len(FORMS)].format(t=rng.choice(TOPICS)) for _ in range(3)]
        tasks.insert(rng.randrange(4), bad.format(t=rng.choice(TOPICS)))
        tasks.insert(0, CLASSIFY_FORM.format(t=rng.choice(TOPICS)))  # the first reply's first task is kept
        start = int(re.search(r"Task (\d+):$", prompt.rstrip()).group(1))
        return " " + tasks[0] + "".join(f"\nTask {start + k}: {t}" for k, t in enumerate(tasks[1:], start=1))
    if prompt.rstrip().endswith("Is it classification?"):
        task = prompt.rstrip().splitlines()[-2]
        return "Yes" if "Classify" in task else "No"
    if "is a classification task" in prompt.split("\n\n")[0]:
        return ("Class label: Urgent\nInput: The pipe under the sink is leaking.\n\n"
                "Class label: Not urgent\nInput: Buy stamps next week.")
    return f"Input: a beginner's question\nOutput: Here is a careful answer ({rng.randint(0, 10**6)})."


def nondeterministic_teacher() -> CannedChat:
    rng = random.Random()  # unseeded: the server samples differently every run, as real ones do
    return CannedChat(lambda prompt: teacher_reply(prompt, rng))


def gen_recipe(url: str, count: int = 20, extra: str = "") -> str:
    return f"""name: gen
base: {{model: "builtin:tiny-llama"}}
sources:
  - name: synth
    format: self_instruct
    generate:
      seed_tasks: data/demo_seed_tasks.jsonl
      count: {count}
      teacher: {{openai: {{base_url: "{url}", model: canned-teacher, revision: r1}}}}
      sampling: {{temperature: 0.7, top_p: 0.95, max_tokens: 256}}
      seed: 1
{extra}"""


def make_gen_project(root: Path, url: str, count: int = 20, extra: str = "") -> Path:
    from helpers import make_project

    make_project(root, gen_recipe(url, count, extra), name="gen")
    (root / "params.yaml").write_text(
        "recipes: [gen]\ndevice: cpu\ncache_dir: .tunefile\n"
        "endpoints: {api_key_env: TEACHER_KEY, concurrency: 4, timeout_s: 5, retries: 1}\n")
    return root


def build_generate(root: Path):
    """What `dvc repro` runs for the generate DVC stage: `tunefile stage generate gen`."""
    from builder.engine.build import run_dvc_stage
    from builder.recipe.project import load_project

    lines: list[str] = []
    run_dvc_stage(load_project(root), "gen", "generate", say=lines.append)
    return lines


def out(root: Path, name: str) -> Path:
    return root / "build" / "gen" / "generate" / "synth" / name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# Parsing and filters -------------------------------------------------------------------------------------

def test_instruction_replies_are_parsed_as_the_paper_numbers_them():
    def tasks(reply: str, truncated: bool = False) -> list[tuple]:
        return [(c.instruction, c.instances, c.cut) for c in parse_instructions(reply, truncated)]

    reply = (" Plan a picnic menu for six people.\nTask 10: Name two rivers in Spain.\n\n"
             "task 11 : Translate 'hello' into French.\n")
    assert tasks(reply) == [("Plan a picnic menu for six people.", (), False), ("Name two rivers in Spain.", (), False),
                            ("Translate 'hello' into French.", (), False)]
    # A chat reply that restates the number, cut by max_tokens: its last task is marked.
    assert tasks("Task 9: Write a haiku.\nTask 10: Sort these words", True) == [
        ("Write a haiku.", (), False), ("Sort these words", (), True)]
    assert [t for t, _, _ in tasks("9. give a synonym for happy\n10. Name a prime number")] == [
        "Give a synonym for happy", "Name a prime number"]
    # Tasks written with their instance: after "Task N:", and in Alpaca's numbered blocks.
    assert tasks("Task 9: Add the numbers.\nInput: 2 and 3\nOutput: 5\nTask 10: Name a colour.\nOutput: Blue") == [
        ("Add the numbers.", (("2 and 3", "5"),), False), ("Name a colour.", (("", "Blue"),), False)]
    alpaca = ("1. Instruction: Give a synonym for quick.\n1. Input:\n<noinput>\n1. Output:\nFast.\n###\n"
              "2. Instruction: Reverse the word.\n2. Input:\nstressed\n2. Output:\ndesserts\n###\n")
    assert tasks(alpaca) == [("Give a synonym for quick.", (("<noinput>", "Fast."),), False),
                             ("Reverse the word.", (("stressed", "desserts"),), False)]


def test_each_filter_rejects_with_its_reason():
    seeds = ["Rewrite the sentence so that it sounds polite and professional."]
    f = InstructionFilter(seeds, rouge_l_max=0.7, min_words=4, max_words=12)
    assert f.check("Too short.") == ("too_short", "2 words (min_words 4)")
    assert f.check("One two three four five six seven eight nine ten eleven twelve thirteen")[0] == "too_long"
    assert f.check("Draw the water cycle for a class")[0] == "blacklisted"
    assert f.check("Go to the shop and buy milk")[0] == "blacklisted"
    assert f.check("Filed reports are due on Monday, explain why") is None  # 'file' only as a whole word
    assert f.check("\"Quote\" the first line of a famous song")[0] == "starts_with_punctuation"
    assert f.check("Écrivez une phrase sur la pluie, s'il vous plaît")[0] == "non_ascii_start"
    reason, detail = f.check("Rewrite this sentence so that it sounds polite and professional.")
    assert reason == "rouge_l" and "with: Rewrite the sentence" in detail  # a near-copy of the seed
    assert f.check("Name three birds that live near the sea") is None
    assert f.check("Name three birds that live near the sea")[0] == "rouge_l"  # now it is kept: a repeat is not new


def test_instances_input_first_output_first_and_the_paper_instance_rules():
    reply = "Example 1\nInput: 2, 4, 6\nOutput: 8\n\nExample 2\nOutput: A list needs no input here.\nTask: next task"
    assert parse_instances(reply, classification=False) == [("2, 4, 6", "8"), ("", "A list needs no input here.")]
    assert parse_instances("The capital of France is Paris.", classification=False) == [
        ("", "The capital of France is Paris.")]
    labels = "Class label: Positive\nInput: I loved it.\nClass label: Negative\nInput: It broke at once."
    assert parse_instances(labels, classification=True) == [
        ("I loved it.", "Positive"), ("It broke at once.", "Negative")]
    kept, dropped = check_instances("Add the numbers.",
                                    [("1 2", "3"), ("1 2", "3"), ("x", "x"), ("y", ""), ("None", "ok")])
    assert kept == [{"input": "1 2", "output": "3"}, {"input": "", "output": "ok"}]
    assert sorted(dropped) == ["empty output", "output repeats the input", "repeated instance"]
    assert [classification_answer(r) for r in ("Yes.", "No", "It depends", "no, but yes")] == [True, False, None, False]


def test_bad_seed_tasks_name_their_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "A task", "instances": []}\n{"instances": []}\n')
    with pytest.raises(DataError, match=r"seeds.jsonl:2: not a Self-Instruct seed task"):
        read_seed_tasks(path)


@pytest.mark.skipif(not SHARED_SEEDS.is_file(), reason="../shared/data is not on this machine")
def test_the_175_alpaca_seed_tasks_read_and_filter_as_the_paper_says():
    seeds = read_seed_tasks(SHARED_SEEDS)
    assert len(seeds) == 175 and sum(s.is_classification for s in seeds) == 26
    f = InstructionFilter([s.instruction for s in seeds], 0.7, 4, 150)
    assert f.check(seeds[3].instruction)[0] == "rouge_l"  # every seed is indexed: a copy is not new


# A served teacher ----------------------------------------------------------------------------------------

def test_a_served_teacher_keeps_count_tasks_and_says_why_it_dropped_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-teacher-secret-123")
    server = nondeterministic_teacher()
    try:
        root = make_gen_project(tmp_path / "p", server.url)
        build_generate(root)
        tasks, rejects = read_jsonl(out(root, "generated.jsonl")), read_jsonl(out(root, "rejects.jsonl"))
        stats = json.loads(out(root, "stats.json").read_text())
        assert len(tasks) == 20 == stats["kept"] and stats["count_reached"]
        assert all(t["instances"] and t["instances"][0]["output"] for t in tasks)
        classified = [t for t in tasks if t["instruction"].startswith("Classify")]
        assert classified and all(t["is_classification"] and t["instances"][0]["output"] == "Urgent"
                                  for t in classified)
        reasons = {r["reason"] for r in rejects}
        assert {"rouge_l", "blacklisted", "too_short", "starts_with_punctuation", "non_ascii_start"} <= reasons
        assert all(r["detail"] for r in rejects)
        assert stats["rejects"]["rouge_l"] == sum(r["reason"] == "rouge_l" for r in rejects)
        assert stats["candidates"] == len(rejects) + stats["kept"] + stats["surplus"]
        assert stats["requests"]["total"] == len(server.requests) and stats["tokens"]["completion"] > 0
        assert {r["headers"]["Authorization"] for r in server.requests} == {"Bearer sk-teacher-secret-123"}
        assert all(r["body"]["model"] == "canned-teacher" and "seed" in r["body"] for r in server.requests)
        assert (root / "build" / "gen" / "generate@synth" / "generated.jsonl").is_file()  # the stage's name finds it
        for path in [*root.joinpath("build").rglob("*"), *root.joinpath(".tunefile").rglob("*")]:
            if path.is_file():
                assert b"sk-teacher-secret-123" not in path.read_bytes(), path

        # Rebuilt from scratch (stage store gone), from the request cache: no request, the same bytes.
        first = {n: out(root, n).read_bytes() for n in ("generated.jsonl", "rejects.jsonl", "stats.json")}
        sent = len(server.requests)
        import shutil

        shutil.rmtree(root / "build")
        shutil.rmtree(root / ".tunefile" / "stages")
        build_generate(root)
        assert len(server.requests) == sent
        assert {n: out(root, n).read_bytes() for n in first} == first
        manifest = json.loads(out(root, "manifest.json").read_text())
        assert manifest["summary"]["requests_sent"] == 0
        assert manifest["summary"]["cache_hits"] == stats["requests"]["total"]
    finally:
        server.close()


def test_a_larger_count_or_a_new_filter_sends_only_new_requests(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "k")
    server = nondeterministic_teacher()
    try:
        # Two prompts a round keep at most 8 new tasks, so 24 cannot come from the rounds that kept 12.
        root = make_gen_project(tmp_path / "p", server.url, count=12, extra="      requests_per_round: 2\n")
        build_generate(root)
        before = read_jsonl(out(root, "generated.jsonl"))
        seen = server.prompts()
        recipe = root / "recipes" / "gen.yaml"
        recipe.write_text(recipe.read_text().replace("count: 12", "count: 24"))
        build_generate(root)
        after = read_jsonl(out(root, "generated.jsonl"))
        new = server.prompts()[len(seen):]
        assert new and not set(new) & set(seen) and len(set(new)) == len(new)
        assert after[:12] == before and len(after) == 24  # the same stream, continued
        # A looser novelty filter re-decides the cached replies: no instruction prompt is sent again.
        seen = server.prompts()
        recipe.write_text(recipe.read_text().replace("seed: 1", "seed: 1\n      rouge_l_max: 0.9"))
        build_generate(root)
        new = server.prompts()[len(seen):]
        assert not [p for p in new if p.rstrip().endswith(":")]  # instruction prompts all from the cache
        assert not set(new) & set(seen)
        assert read_jsonl(out(root, "generated.jsonl")) != after
    finally:
        server.close()


def test_a_killed_generation_resumes_without_resending_an_answered_request(tmp_path, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "k")
    rng = random.Random()
    server = CannedChat(lambda prompt: teacher_reply(prompt, rng), answer_at_most=14)
    try:
        root = make_gen_project(tmp_path / "p", server.url)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        proc = subprocess.Popen(["tunefile", "stage", "generate", "gen"], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        db = root / ".tunefile" / "teacher-requests.sqlite"
        deadline = time.time() + 60
        while time.time() < deadline:  # killed once every answered reply is committed and the rest wait
            stored = _rows(db)
            if server.answered() == 14 and stored == 14 and len(server.requests) > 14:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail(f"the build did not reach 14 stored replies ({server.answered()} answered)")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = set(server.prompts(answered_only=True))
        sent = len(server.requests)
        assert not out(root, "generated.jsonl").exists()
        server.release()
        build_generate(root)
        resent = server.prompts()[sent:]
        assert resent and not set(resent) & answered  # the waiting ones are asked again, answered ones never
        assert len(read_jsonl(out(root, "generated.jsonl"))) == 20
    finally:
        server.close()


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_an_unreachable_teacher_or_a_missing_key_is_a_clear_error_within_seconds(tmp_path, monkeypatch):
    from builder.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = make_gen_project(tmp_path / "p", f"http://127.0.0.1:{port}/v1")
    monkeypatch.chdir(root)
    monkeypatch.delenv("TEACHER_KEY", raising=False)
    with pytest.raises(StageError, match="endpoints.api_key_env names TEACHER_KEY, which is not set"):
        build_generate(root)
    monkeypatch.setenv("TEACHER_KEY", "k")
    started = time.time()
    assert main(["build", "gen", "--until", "generate"]) == 1
    assert time.time() - started < 5
    with pytest.raises(StageError, match=r"^sources\[synth\].generate.teacher: cannot reach http://127.0.0.1:\d+/v1/chat"):
        build_generate(root)


def test_a_server_that_never_answers_fails_after_its_timeouts_not_after_every_request(tmp_path, monkeypatch):
    """It accepts connections and says nothing: one request's timeouts and retries decide, and the
    requests still in flight do not hold the build up."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        monkeypatch.setenv("TEACHER_KEY", "k")
        root = make_gen_project(tmp_path / "p", f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
        (root / "params.yaml").write_text(
            "recipes: [gen]\ndevice: cpu\n"
            "endpoints: {api_key_env: TEACHER_KEY, concurrency: 4, timeout_s: 1, retries: 1}\n")
        started = time.time()
        with pytest.raises(StageError, match="accepted the connection but sent no answer within 1 s, 2 times"):
            build_generate(root)
        assert time.time() - started < 6  # 2 x 1 s and a 0.5 s backoff, not 8 requests x 2 x 1 s
    finally:
        listener.close()


def test_cut_off_or_unlabelled_instance_replies_give_no_instance():
    cut = "Input: a\nOutput: b\nInput: c\nOutput: half of an ans"
    assert parse_instances(cut, False, truncated=True) == [("a", "b")]
    assert parse_instances("It is probably positive.", classification=True) == []  # a label needs its field
    assert parse_instances("Input: I loved it.\nOutput: Positive", classification=True) == [("I loved it.", "Positive")]


def test_a_teacher_server_without_a_chat_endpoint_is_asked_for_completions(tmp_path, monkeypatch):
    """A server with /v1/completions only (a 404 for chat) gets the prompt as plain text."""
    rng = random.Random(0)
    server = CannedChat(lambda prompt: teacher_reply(prompt, rng), chat=False)
    try:
        monkeypatch.setenv("TEACHER_KEY", "k")
        root = make_gen_project(tmp_path / "p", server.url, count=5)
        build_generate(root)
        assert len(read_jsonl(out(root, "generated.jsonl"))) == 5
        paths = [r["path"] for r in server.requests]
        # one 404, then completions
        assert paths.count("/v1/chat/completions") == 1 and paths.count("/v1/completions") > 4
    finally:
        server.close()


def test_tasks_written_with_their_instances_need_no_instance_request(tmp_path, monkeypatch):
    """A teacher answering in Alpaca's blocks (instruction, input, output together) is used as it is."""
    rng = random.Random(0)

    def blocks(prompt: str) -> str:
        if prompt.rstrip().endswith("Is it classification?"):
            return "No"
        assert "Write examples" not in prompt and "classification task. For each" not in prompt
        picks = [rng.choice(FORMS).format(t=rng.choice(TOPICS)) for _ in range(3)]
        return "".join(f"{k}. Instruction: {t}\n{k}. Input:\n<noinput>\n{k}. Output:\nAnswer {rng.random()}\n###\n"
                       for k, t in enumerate(picks, start=9))

    server = CannedChat(blocks)
    try:
        monkeypatch.setenv("TEACHER_KEY", "k")
        root = make_gen_project(tmp_path / "p", server.url, count=8)
        build_generate(root)
        tasks = read_jsonl(out(root, "generated.jsonl"))
        stats = json.loads(out(root, "stats.json").read_text())
        assert len(tasks) == 8 and stats["requests"]["instances"] == 0
        assert all(t["instances"][0]["input"] == "" and t["instances"][0]["output"].startswith("Answer") for t in tasks)
    finally:
        server.close()


@pytest.mark.skipif(not SHARED_SEEDS.is_file(), reason="../shared/data is not on this machine")
def test_generation_from_the_175_real_seed_tasks(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("TEACHER_KEY", "k")
    server = nondeterministic_teacher()
    try:
        root = make_gen_project(tmp_path / "p", server.url, count=10)
        shutil.copy(SHARED_SEEDS, root / "data" / "demo_seed_tasks.jsonl")
        build_generate(root)
        stats = json.loads(out(root, "stats.json").read_text())
        assert stats["seed_tasks"] == 175 and stats["kept"] == 10
        first = server.requests[0]["body"]["messages"][0]["content"]
        # Eight seed tasks shown (none generated yet), one per line, then "Task 9:" for the teacher to write.
        assert re.findall(r"^Task (\d+):", first, re.MULTILINE) == [str(k) for k in range(1, 10)]
        assert first.endswith("\nTask 9:")
    finally:
        server.close()


# Real teachers on the tiny model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A project with the builtin tiny base model built (its stage store is what other projects reuse)."""
    from helpers import make_project

    from builder.engine.build import build_recipe
    from builder.recipe.project import load_project

    root = make_project(tmp_path_factory.mktemp("teacher") / "p")
    build_recipe(load_project(root), "default", until="base", say=lambda line: None)
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tiny_base) -> Path:
    """The tiny base model as an f16 GGUF, converted by llama.cpp's converter."""
    from builder.export.convert import convert_model
    from builder.recipe.project import load_project

    project = load_project(tiny_base)
    path = tiny_base / "teacher.gguf"
    convert_model(project.load_recipe("default"), project.stage_dir("default", "base"), path, "f16", "teacher", {})
    return path


def test_the_in_process_gguf_teacher_says_why_its_output_was_rejected(tiny_gguf, tmp_path, capfd):
    import shutil

    root = make_gen_project(tmp_path / "p", "http://unused", count=2,
                            extra="      max_requests: 2\n      requests_per_round: 2\n")
    shutil.copy(tiny_gguf, root / "teacher.gguf")
    recipe = root / "recipes" / "gen.yaml"
    served = '{openai: {base_url: "http://unused", model: canned-teacher, revision: r1}}'
    recipe.write_text(recipe.read_text().replace(served, "{gguf: teacher.gguf}")
                      .replace("max_tokens: 256", "max_tokens: 48"))
    build_generate(root)
    stats = json.loads(out(root, "stats.json").read_text())
    rejects = read_jsonl(out(root, "rejects.jsonl"))
    assert stats["teacher"].startswith("gguf:") and stats["requests"]["instruction"] == 2
    assert stats["tokens"]["completion"] > 0
    # What the tiny model writes depends on the CPU's float kernels; what the stage makes of it does not:
    # every candidate is kept or rejected with a reason and a detail, the stats count exactly those
    # rejects, and a count not reached is one warning that names the kept number and the reasons.
    assert stats["candidates"] == len(rejects) + stats["kept"]
    reasons = collections.Counter(r["reason"] for r in rejects)
    assert stats["rejects"] == dict(reasons) and all(r["detail"] for r in rejects)
    assert all((r["round"], r["request"]) in ((0, 0), (0, 1)) for r in rejects)
    top = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(4)) or "none"
    expected = [] if stats["kept"] == 2 else [
        f"warning: gen/generate@synth: kept {stats['kept']} of 2 tasks after 2 instruction requests "
        f"(generate.max_requests 2); rejects: {top}; see build/gen/generate/synth/rejects.jsonl"]
    assert [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")] == expected


def test_llama_cpp_server_as_the_teacher(tiny_gguf, tmp_path, monkeypatch):
    """The real OpenAI-compatible server of llama-cpp-python[server], on the tiny model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf),
                               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--model_alias", "tiny"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        monkeypatch.setenv("TEACHER_KEY", "k")
        root = make_gen_project(tmp_path / "p", f"http://127.0.0.1:{port}/v1", count=2,
                                extra="      max_requests: 2\n      requests_per_round: 2\n")
        recipe = root / "recipes" / "gen.yaml"
        recipe.write_text(recipe.read_text().replace("max_tokens: 256", "max_tokens: 48"))
        build_generate(root)
        stats = json.loads(out(root, "stats.json").read_text())
        assert stats["teacher"] == "openai:canned-teacher@r1" and stats["requests"]["instruction"] == 2
        assert stats["tokens"]["prompt"] > 0 and stats["tokens"]["completion"] > 0  # the server's own usage counts
        assert stats["candidates"] == len(read_jsonl(out(root, "rejects.jsonl"))) + stats["kept"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_generated_source_feeds_the_dataset(tiny_base, tmp_path, monkeypatch):
    """The dataset stage reads generated.jsonl like a file source, beside the recipe's other sources."""
    import shutil

    import pyarrow.parquet as pq

    from builder.engine.build import build_recipe
    from builder.engine.plan import plan_stages
    from builder.recipe.project import load_project

    monkeypatch.setenv("TEACHER_KEY", "k")
    server = nondeterministic_teacher()
    try:
        root = make_gen_project(tmp_path / "p", server.url, count=10, extra=(
            "  - {name: demo_alpaca, path: data/demo_alpaca.jsonl, format: alpaca}\n"
            "mixture: {seed: 1, eval_fraction: 0.0}\n"))
        shutil.copytree(tiny_base / ".tunefile" / "stages", root / ".tunefile" / "stages")  # the base, built once
        project = load_project(root)
        build_recipe(project, "gen", until="dataset", say=lambda line: None)
        table = pq.read_table(root / "build" / "gen" / "dataset" / "train.parquet", columns=["source"])
        counts = {s: table.column("source").to_pylist().count(s) for s in ("synth", "demo_alpaca")}
        instances = json.loads(out(root, "stats.json").read_text())["instances"]
        assert counts == {"synth": instances, "demo_alpaca": 237}
        plan = {s.name: s for s in plan_stages(project.load_recipe("gen"), project)}
        assert "generate@synth" in plan["dataset"].upstream
    finally:
        server.close()


def test_dvc_repro_generates_and_dvc_push_shares_the_generated_rows(tiny_base, tmp_path, monkeypatch):
    """Under DVC: generate runs before dataset, a second repro runs nothing, and a clone gets the
    generated rows with `dvc pull` without asking the teacher."""
    import shutil

    from helpers import run_in, stages_run

    monkeypatch.setenv("TEACHER_KEY", "k")
    server = nondeterministic_teacher()
    try:
        root = make_gen_project(tmp_path / "repo", server.url, count=6)
        shutil.copytree(tiny_base / ".tunefile" / "stages", root / ".tunefile" / "stages")  # the base, built once
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["tunefile", "dvc"]):
            run_in(root, *cmd)
        ran = stages_run(run_in(root, "dvc", "repro", "gen-dataset"))
        assert sorted(ran) == ["gen-base", "gen-dataset", "gen-generate", "resolve"]
        assert ran.index("gen-generate") < ran.index("gen-dataset")
        assert stages_run(run_in(root, "dvc", "repro", "gen-dataset")) == []
        sent = len(server.requests)
        run_in(root, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
        run_in(root, "git", "add", "-A")
        run_in(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "generated")
        run_in(root, "dvc", "push")
        clone = tmp_path / "clone"
        run_in(tmp_path, "git", "clone", "-q", str(root), str(clone))
        run_in(clone, "dvc", "pull", "--with-deps", "gen-dataset")
        assert out(clone, "generated.jsonl").read_bytes() == out(root, "generated.jsonl").read_bytes()
        assert stages_run(run_in(clone, "dvc", "repro", "gen-dataset")) == [] and len(server.requests) == sent
    finally:
        server.close()

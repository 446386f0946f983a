"""Helpers the tests import (`from helpers import ...`): the repo root, throwaway projects, running
commands, and a canned OpenAI-compatible chat server on 127.0.0.1."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"


def run_in(cwd: Path, *cmd: str) -> str:
    """A command (tunefile, dvc, git) run in a project with the venv's bin first on PATH; it must succeed."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def stages_run(output: str) -> list[str]:
    """The DVC stages a `dvc repro` output says it ran."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def make_project(root: Path, recipe_text: str | None = None, name: str = "default") -> Path:
    """A project folder with the repo's data, params.yaml and one recipe (default: the repo's)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "data", root / "data")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "recipes").mkdir()
    text = recipe_text if recipe_text is not None else (REPO / "recipes" / "default.yaml").read_text()
    (root / "recipes" / f"{name}.yaml").write_text(text)
    (root / "params.yaml").write_text(f"recipes: [{name}]\ndevice: cpu\ncache_dir: .tunefile\n")
    return root


def small_recipe(size: int = 240) -> str:
    """The default recipe with a smaller mixture and eval, so end-to-end builds take seconds."""
    text = (REPO / "recipes" / "default.yaml").read_text()
    assert "size: 2000 " in text and "stop_examples: 16 " in text and "max_tokens: 64\n" in text
    # Shorter answers and fewer stop-rate prompts: every rebuild of the eval stage answers them anew.
    return (text.replace("size: 2000 ", f"size: {size} ").replace("stop_examples: 16 ", "stop_examples: 6 ")
            .replace("max_tokens: 64\n", "max_tokens: 32\n"))


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 drops connections of a concurrent client (a 1 s SYN retry each)
    daemon_threads = True


class CannedChat:
    """An OpenAI-compatible /v1/chat/completions server on 127.0.0.1, written for the tests: it
    answers with reply(prompt) and records every request (path, headers, body). With chat=False
    it serves /v1/completions only (chat answers 404), as some servers do."""

    def __init__(self, reply, fail_first: int = 0, answer_at_most: int | None = None, chat: bool = True):
        import threading

        canned = self
        self.requests, self.fail_first = [], fail_first
        # After `answer_at_most` answers, requests wait (unanswered) until release(): a test kills its client then.
        self.answer_at_most, self.gate, self.lock = answer_at_most, threading.Event(), threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = {"path": self.path, "headers": dict(self.headers), "body": body}
                canned.requests.append(record)
                if canned.fail_first > 0 or self.path.endswith("/chat/completions") != chat:
                    canned.fail_first -= self.path.endswith("/chat/completions") == chat
                    self.send_response(503 if self.path.endswith("/chat/completions") == chat else 404)
                    self.end_headers()
                    return
                with canned.lock:
                    hold = canned.answer_at_most is not None and canned.answered() >= canned.answer_at_most
                    if not hold:
                        record["answered"] = True
                if hold:
                    canned.gate.wait()
                    return
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                text = reply(prompt)
                usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}
                choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                data = json.dumps({"choices": [{**choice, "finish_reason": "stop"}], "usage": usage}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.answer_at_most = None
        self.gate.set()

    def answered(self) -> int:
        return sum(1 for r in self.requests if r.get("answered"))

    def prompts(self, answered_only: bool = False) -> list[str]:
        return [r["body"]["messages"][-1]["content"] if "messages" in r["body"] else r["body"]["prompt"]
                for r in self.requests if r.get("answered") or not answered_only]

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()

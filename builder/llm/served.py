"""Models tunefile asks for text: an OpenAI-compatible endpoint over HTTP, or a GGUF file in process.

    client, identity, concurrency = open_served(spec, project, what="teacher")   # spec: ServedModel
    reply = client.chat(prompt, temperature=0.7, top_p=0.95, max_tokens=512, seed=7)
    reply.text, reply.prompt_tokens, reply.completion_tokens, reply.finish_reason

The HTTP client talks to `/chat/completions` (vLLM, llama.cpp server, Ollama, OpenAI) with explicit
timeouts and retries with backoff, and fails within seconds, saying so, when nothing listens; a
server that has no chat endpoint (404) is asked at `/completions` instead. The API key is read from
the environment variable params.yaml `endpoints.api_key_env` names; it is sent as a Bearer header
and goes into no recipe, key, log or file. An identity (what caches key replies by) is the GGUF
file's digest with the llama-cpp-python version, or the served model's name and pinned revision,
never the URL.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from builder.errors import StageError
from builder.hashing import StatCache
from builder.versions import library_version


@dataclass(frozen=True)
class Reply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", or "length" when max_tokens cut it

    def to_dict(self) -> dict:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason}


def _reply(body: dict, chat: bool) -> Reply:
    choice = body["choices"][0]
    text = (choice["message"]["content"] if chat else choice["text"]) or ""
    usage = body.get("usage") or {}
    return Reply(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                 str(choice.get("finish_reason") or "stop"))


class HttpModel:
    """An OpenAI-compatible endpoint; `what` names the recipe key in every message."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float, retries: int, what: str):
        self.base_url, self.model, self.what = base_url.rstrip("/"), model, what
        self.timeout, self.retries = timeout_s, retries
        self.headers = {"Content-Type": "application/json",
                        **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.chat_api: bool | None = None  # known after the first answer: chat, or completions after a 404
        self.first = threading.Lock()  # the first request goes alone, so a server without chat gets one 404

    def chat(self, prompt: str, **sampling: object) -> Reply:
        if self.chat_api is None:
            with self.first:
                if self.chat_api is None:
                    return self._ask(prompt, sampling)
        return self._ask(prompt, sampling)

    def _ask(self, prompt: str, sampling: dict) -> Reply:
        if self.chat_api is not False:
            try:
                reply = self._post("/chat/completions", {"messages": [{"role": "user", "content": prompt}]}, sampling)
                self.chat_api = True
                return reply
            except _NoEndpointError:
                if self.chat_api:
                    raise StageError(f"{self.what}: {self.base_url}/chat/completions answered 404 after answering "
                                     "before; is the server still serving the model?") from None
                self.chat_api = False
        try:
            return self._post("/completions", {"prompt": prompt}, sampling)
        except _NoEndpointError:
            raise StageError(f"{self.what}: {self.base_url} has neither /chat/completions nor /completions "
                             "(404); is base_url the server's /v1?") from None

    def _post(self, path: str, payload: dict, sampling: dict) -> Reply:
        url = self.base_url + path
        body = json.dumps({"model": self.model, **payload, **sampling}).encode()
        for attempt in range(self.retries + 1):
            try:
                request = urllib.request.Request(url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _reply(json.loads(response.read()), chat="messages" in payload)
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise _NoEndpointError from None
                if exc.code in (401, 403):
                    hint = ("check the API key in the variable params.yaml endpoints.api_key_env names"
                            if "Authorization" in self.headers else "no API key was sent: set params.yaml "
                            "endpoints.api_key_env to the name of the environment variable that holds it")
                    raise StageError(f"{self.what}: {url} refused the request ({exc.code}); {hint}") from None
                if exc.code < 500 and exc.code != 429 or attempt == self.retries:
                    said = _body(exc)
                    raise StageError(f"{self.what}: {url} answered {exc.code} {exc.reason}"
                                     + (f" after {attempt + 1} tries" if attempt else "")
                                     + (f": {said}" if said else "")) from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                # A read timeout (a connect one is a URLError).
                if isinstance(exc, TimeoutError) and attempt == self.retries:
                    raise StageError(f"{self.what}: {url} accepted the connection but sent no answer within "
                                     f"{self.timeout:g} s, {attempt + 1} times; is the server overloaded? (params.yaml "
                                     "endpoints.timeout_s and retries)") from None
                if isinstance(reason, ConnectionRefusedError) or attempt == self.retries:
                    raise StageError(f"{self.what}: cannot reach {url} ({reason}); start the server or fix "
                                     f"{self.what}.openai.base_url") from None
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise StageError(f"{self.what}: {url} did not answer like an OpenAI endpoint "
                                 f"({type(exc).__name__}: {exc})") from None
            time.sleep(min(2 ** attempt * 0.5, 8.0))  # 0.5, 1, 2, 4, 8 s: a busy server catches up
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass


def _body(exc: urllib.error.HTTPError) -> str:
    """The first line of what an error response said (servers explain a 400 or a 500 there)."""
    try:
        text = exc.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return text.splitlines()[0][:300] if text else ""


class _NoEndpointError(Exception):
    """The server answered 404 for this path."""


def trained_context(path) -> int | None:
    """The context length a GGUF file's model was trained with (`<arch>.context_length`), read
    from its header without loading it; None when the file does not say."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(name: str):
        field = fields.get(name)
        return None if field is None else field.parts[field.data[0]]

    arch = value("general.architecture")
    length = value(f"{bytes(arch).decode()}.context_length") if arch is not None else None
    return int(length[0]) if length is not None else None


class GgufModel:
    """A GGUF file run in process by llama-cpp-python, prompted through its own chat template."""

    MAX_CONTEXT = 4096  # tokens of KV cache; a model trained on fewer gets its own length

    def __init__(self, path, what: str):
        import llama_cpp

        self.what = what
        n_ctx = min(self.MAX_CONTEXT, trained_context(path) or self.MAX_CONTEXT)  # no window beyond training
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, seed=0, verbose=False)

    def chat(self, prompt: str, **sampling: object) -> Reply:
        self.llm.reset()
        try:
            body = self.llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], **sampling)
        except ValueError as exc:  # llama-cpp-python: the prompt and max_tokens exceed the context
            raise StageError(f"{self.what}: {exc}; lower sampling.max_tokens or the examples per prompt") from None
        return _reply(body, chat=True)

    def close(self) -> None:
        self.llm.close()


def map_concurrent(ask, items: list, concurrency: int) -> list:
    """[ask(item) for item in items] with up to `concurrency` calls at once, results in order. The
    first failure is raised at once: nothing more is sent, and calls still waiting on a server are
    left to their (daemon) threads instead of holding the build up until they time out."""
    if concurrency <= 1 or len(items) <= 1:
        return [ask(item) for item in items]
    todo: queue.Queue = queue.Queue()
    for k, item in enumerate(items):
        todo.put((k, item))
    done: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                k, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((k, ask(item), None))
            except BaseException as exc:  # noqa: BLE001 (handed to the caller, who raises it)
                done.put((k, None, exc))

    for _ in range(min(concurrency, len(items))):
        threading.Thread(target=work, daemon=True).start()
    results: list = [None] * len(items)
    for _ in range(len(items)):
        k, value, exc = done.get()
        if exc is not None:
            stop.set()
            raise exc
        results[k] = value
    return results


def api_key(project, what: str) -> str | None:
    """The API key from the variable params.yaml `endpoints.api_key_env` names (None when it names none)."""
    name = project.params.endpoints.api_key_env
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise StageError(f"{what}: params.yaml endpoints.api_key_env names {name}, which is not set in the environment")
    return key


def open_served(spec, project, what: str) -> tuple[object, str, int]:
    """(client, identity, concurrency) for a ServedModel: a GGUF file runs one request at a time;
    an endpoint takes params.yaml `endpoints.concurrency` at once."""
    if spec.gguf is not None:
        path = project.root / spec.gguf
        if not path.is_file():
            raise StageError(f"{what}.gguf: {spec.gguf} is not a file")
        stat = StatCache(project.cache_dir / "stat-cache.json")  # planning digested it: no second read of the file
        identity = f"gguf:{stat.digest(path)}:llama-cpp-python-{library_version('llama_cpp_python')}"
        stat.save()
        return GgufModel(path, what), identity, 1
    served, endpoints = spec.openai, project.params.endpoints
    identity = f"openai:{served.model}" + (f"@{served.revision}" if served.revision else "")
    client = HttpModel(served.base_url, served.model, api_key(project, what), endpoints.timeout_s, endpoints.retries,
                       what)
    return client, identity, endpoints.concurrency

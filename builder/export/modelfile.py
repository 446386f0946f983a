"""The Ollama Modelfile written beside each quantized GGUF, so `ollama create` gets the training template.

    ollama create my-model -f build/default/quantize@q4_k_m/Modelfile

FROM names the GGUF next to it. For a built-in template, TEMPLATE is the same chat format in
Ollama's Go template syntax (rendering .Messages as the Jinja template renders messages with
add_generation_prompt). For any other template, Ollama has to recognise the Jinja template the GGUF
carries in `tokenizer.chat_template`; the Modelfile says so and quotes that template as comments.
PARAMETER stop lines hold the template's end-of-turn marker (and the tokens that open a new turn).
Everything is read from the GGUF itself, so the Modelfile always matches the file it sits beside.
"""
from __future__ import annotations

from pathlib import Path

from builder.templates import builtin_name, stop_texts

# Go templates for the built-in formats. {BOS} is replaced by the BOS text where the Jinja template
# writes it and llama.cpp does not add one itself (tokenizer.ggml.add_bos_token false); {EOS} by
# the EOS text. A last assistant message is left open (Ollama continues it), as Ollama's own do.
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 -}}"
_CHATML = """{{- range $i, $_ := .Messages }}
%(last)s
<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""
OLLAMA_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    # Qwen2.5 is ChatML with a default system message where the conversation has none.
    "qwen2.5": """{{- if not .System }}<|im_start|>system
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
{{ end }}
""" + _CHATML,
    "llama-3": """{BOS}
{{- range $i, $_ := .Messages }}
%(last)s
<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|eot_id|>{{ end }}
{{- if and (ne .Role "assistant") $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}""",
    "zephyr": """{{- range $i, $_ := .Messages }}
%(last)s
<|{{ .Role }}|>
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}{EOS}
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|assistant|>
{{ end }}
{{- end }}""",
    "phi-3": """{{- range $i, $_ := .Messages }}
%(last)s
<|{{ .Role }}|>
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|assistant|>
{{ end }}
{{- end }}""",
    "gemma": """{BOS}
{{- $first := true }}
{{- range $i, $_ := .Messages }}
%(last)s
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}
{{- if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}""",
    "mistral": """{BOS}
{{- $first := true }}
{{- range $i, $_ := .Messages }}
%(last)s
{{- if eq .Role "user" }}[INST] {{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}{EOS}{{ end }}
{{- end }}
{{- end }}""",
    "llama-2": """{{- $first := true }}
{{- range $i, $_ := .Messages }}
%(last)s
{{- if eq .Role "user" }}{{ if not $first }}{BOS_EVERY}{{ else }}{BOS}{{ end }}"""
    """[INST] {{ if and $first $.System }}<<SYS>>
{{ $.System }}
<</SYS>>

{{ end }}{{ .Content }} [/INST]{{ $first = false }}
{{- else if eq .Role "assistant" }} {{ .Content }}{{ if not $last }} {EOS}{{ end }}
{{- end }}
{{- end }}""",
    "vicuna": """{{ if .System }}{{ .System }}{{ else }}A chat between a curious user and an artificial """
    """intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's """
    """questions.{{ end }}{{ " " }}
{{- range $i, $_ := .Messages }}
%(last)s
{{- if eq .Role "user" }}USER: {{ .Content }} {{ if $last }}ASSISTANT:{{ end }}
{{- else if eq .Role "assistant" }}ASSISTANT: {{ .Content }}{{ if not $last }}{EOS}{{ end }}
{{- end }}
{{- end }}""",
    "alpaca": """{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. """
    """Write a response that appropriately completes the request.{{ end }}
{{- range $i, $_ := .Messages }}
%(last)s
{{- if eq .Role "user" }}

### Instruction:
{{ .Content }}

### Response:
{{ else if eq .Role "assistant" }}{{ .Content }}{{ if not $last }}{EOS}{{ end }}
{{- end }}
{{- end }}""",
}
# Tokens that open a new turn: the model writing one has finished its answer.
TURN_OPENERS = {"chatml": ["<|im_start|>"], "qwen2.5": ["<|im_start|>"], "llama-3": ["<|start_header_id|>"],
                "zephyr": ["<|user|>"], "phi-3": ["<|user|>"], "gemma": ["<start_of_turn>"],
                "mistral": ["[INST]"], "llama-2": ["[INST]"], "vicuna": ["USER:"], "alpaca": ["### Instruction:"]}


def go_template(name: str, bos_token: str, eos_token: str, add_bos: bool) -> str:
    """The built-in template `name` in Ollama's syntax, with the model's BOS/EOS text filled in."""
    text = OLLAMA_TEMPLATES[name] % {"last": _LAST}
    # The first BOS comes from llama.cpp when the GGUF asks it to add one; later ones (llama-2
    # opens every turn with BOS) are always written.
    return (text.replace("{BOS_EVERY}", bos_token).replace("{BOS}", "" if add_bos else bos_token)
            .replace("{EOS}", eos_token))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_modelfile(gguf_file: str, template: str, bos_token: str, eos_token: str, add_bos: bool,
                     no_end_of_turn: str = "append_eos") -> str:
    """Modelfile text for `gguf_file` (a name in the same folder) trained with `template`. A template
    without an end-of-turn token stops on EOS (appended in training) and on the next turn's opener."""
    name = builtin_name(template)
    trained = stop_texts(template, no_end_of_turn, bos_token=bos_token, eos_token=eos_token)
    opener = stop_texts(template, "keep", bos_token=bos_token, eos_token=eos_token)
    stops = [s for s in dict.fromkeys([*trained, *TURN_OPENERS.get(name, []), *opener,
                                       *([eos_token] if eos_token else [])]) if s]
    lines = ["# Ollama Modelfile written by tunefile; use it with `ollama create NAME -f Modelfile`.",
             f"FROM ./{gguf_file}"]
    if name is not None:
        lines += [f"# TEMPLATE: the built-in `{name}` chat template, as trained, in Ollama's syntax.",
                  f'TEMPLATE """{go_template(name, bos_token, eos_token, add_bos)}"""']
    else:
        lines += ["# TEMPLATE: not converted. tunefile converts only its built-in templates to Ollama's Go",
                  "# syntax; Ollama uses the GGUF's tokenizer.chat_template when it recognises it. If it does",
                  "# not, write a TEMPLATE that renders exactly this training template:",
                  *[f"#   {line}".rstrip() for line in template.splitlines()]]
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def read_gguf_chat_settings(path: Path) -> tuple[str, str, str, bool, str]:
    """(chat template, BOS text, EOS text, add_bos, no_end_of_turn policy) from a GGUF's metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str):
        return reader.fields[key].contents() if key in reader.fields else None

    tokens = field("tokenizer.ggml.tokens") or []

    def token_text(key: str) -> str:
        index = field(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

    template = field("tokenizer.chat_template")
    if not isinstance(template, str):
        raise ValueError(f"{path} carries no tokenizer.chat_template")
    return (template, token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id"),
            bool(field("tokenizer.ggml.add_bos_token")), field("tunefile.no_end_of_turn") or "append_eos")


def write_modelfile(gguf_path: Path) -> Path:
    """Write `Modelfile` beside the GGUF, from the GGUF's own template and tokens; return its path."""
    template, bos, eos, add_bos, policy = read_gguf_chat_settings(gguf_path)
    out = gguf_path.parent / "Modelfile"
    out.write_text(render_modelfile(gguf_path.name, template, bos, eos, add_bos, policy), encoding="utf-8")
    return out

"""Token ids and labels built in one step from a conversation, so they cannot drift apart.

    chat = tokenize_chat(template, messages, tokenizer, train_on="all_assistant")
    chat.input_ids, chat.labels       # labels: the token id where it carries loss, else -100
    chats = tokenize_chats(template, conversations, tokenizer)   # batched; refusals in place

The text is rendered as transformers' apply_chat_template renders it (with the tokenizer's special
tokens as template variables) and tokenized without adding special tokens, as apply_chat_template
does: the template owns BOS. Labels come from the trained character spans through the
tokenizer's offsets: a token is trained iff all its characters lie in one span.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from builder.templates.errors import TemplateError
from builder.templates.spans import RenderedChat, append_eos, render_chat

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedChat:
    text: str
    trained_spans: list[tuple[int, int]]
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    appended: tuple[tuple[int, int], ...] = ()  # text tunefile added (EOS, no_end_of_turn: append_eos)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def label_tokens(input_ids: list[int], offsets: list[tuple[int, int]],
                 spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained iff all its characters lie in one trained span; else IGNORE_INDEX.
    Spans are sorted and disjoint (render_chat's are)."""
    import numpy as np

    if not input_ids:
        return []
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], bounds[:, 1]
    if not spans:
        return [IGNORE_INDEX] * len(input_ids)
    span_starts, span_ends = np.asarray(spans, dtype=np.int64).T
    k = np.searchsorted(span_ends, starts, side="right")  # the first span ending after the token starts
    k_safe = np.minimum(k, len(spans) - 1)
    inside = (k < len(spans)) & (ends > starts) & (span_starts[k_safe] <= starts) & (ends <= span_ends[k_safe])
    return np.where(inside, np.asarray(input_ids, dtype=np.int64), IGNORE_INDEX).tolist()


def template_tokens(tokenizer) -> dict[str, str | None]:
    """The special tokens transformers passes to a chat template (bos_token, eos_token, ...).
    bos_token and eos_token are always present: None where the tokenizer has none, so that
    render_chat leaves them undefined as transformers does (rather than defaulting to `<s>`)."""
    tokens = {name: str(value) for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    return {"bos_token": None, "eos_token": None, **tokens}


def check_bos(input_ids: list[int], bos_token_id: int | None) -> None:
    """Refuse a doubled BOS: the template writes BOS and something (the template again, or a
    tokenizer asked to add special tokens) put another in front of it."""
    if bos_token_id is not None and input_ids[:2] == [bos_token_id, bos_token_id]:
        raise TemplateError("the tokens start with two BOS tokens: the template writes bos_token and the "
                            "tokenizer (or the template itself) adds another; keep exactly one",
                            reason="double_bos")


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids and character offsets per text, no special tokens added (the template owns them).
    A fast tokenizer's Rust backend is called directly: the same ids as tokenizer(texts), batched
    in Rust, without the Python wrapper's overhead."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(list(ids), [tuple(o) for o in offsets])
            for ids, offsets in zip(encoding["input_ids"], encoding["offset_mapping"])]


def _labelled(rendered: RenderedChat, ids: list[int], offsets: list[tuple[int, int]], bos_token_id: int | None,
              is_prompt: bool) -> TokenizedChat:
    check_bos(ids, bos_token_id)
    labels = label_tokens(ids, offsets, rendered.trained_spans)
    if not is_prompt and all(label == IGNORE_INDEX for label in labels):
        why = ("every trained character shares a token with untrained ones" if rendered.trained_spans
               else "it has no assistant message to train on")
        raise TemplateError(f"no token of this example carries loss: {why}", reason="no_trained_tokens")
    return TokenizedChat(rendered.text, rendered.trained_spans, list(ids), labels, list(offsets), rendered.appended)


def apply_policy(rendered: RenderedChat, no_end_of_turn: str, eos_token: str | None) -> RenderedChat:
    """The recipe's `no_end_of_turn` policy on a render whose template writes no end-of-turn token."""
    if not rendered.turn_ends or no_end_of_turn != "append_eos":
        return rendered
    if not eos_token:
        raise TemplateError("the template writes no end-of-turn token and the tokenizer has no eos_token to "
                            "append; set no_end_of_turn: keep or use a template that closes turns",
                            reason="no_end_of_turn")
    return append_eos(rendered, eos_token)


def tokenize_chat(template_source: str, messages: list[dict], tokenizer, train_on: str = "all_assistant",
                  add_generation_prompt: bool = False, no_end_of_turn: str = "append_eos",
                  **extra) -> TokenizedChat:
    """Render, tokenize and label one conversation; raise TemplateError (with a countable
    `reason`) for a doubled BOS, or for a training example (no generation prompt) in which no
    token carries loss. A template without an end-of-turn token gets EOS appended after each
    trained answer unless no_end_of_turn is `keep`."""
    variables = {**template_tokens(tokenizer), **extra}
    rendered = render_chat(template_source, messages, add_generation_prompt=add_generation_prompt,
                           train_on=train_on, **variables)
    if not add_generation_prompt:
        rendered = apply_policy(rendered, no_end_of_turn, variables.get("eos_token"))
    (ids, offsets), = encode_texts(tokenizer, [rendered.text])
    return _labelled(rendered, ids, offsets, tokenizer.bos_token_id, add_generation_prompt)


def tokenize_chats(template_source: str, conversations: list[list[dict]], tokenizer,
                   train_on: str = "all_assistant", no_end_of_turn: str = "append_eos",
                   **extra) -> list[TokenizedChat | TemplateError]:
    """tokenize_chat for many training conversations, tokenized in one batch. A conversation the
    template refuses gets its TemplateError in its place (to count as a reject by `.reason`)."""
    variables = {**template_tokens(tokenizer), **extra}
    results: list[RenderedChat | TemplateError | TokenizedChat] = []
    for messages in conversations:
        try:
            rendered = render_chat(template_source, messages, train_on=train_on, **variables)
            results.append(apply_policy(rendered, no_end_of_turn, variables.get("eos_token")))
        except TemplateError as exc:
            results.append(exc)
    encoded = iter(encode_texts(tokenizer, [r.text for r in results if isinstance(r, RenderedChat)]))
    for i, result in enumerate(results):
        if isinstance(result, RenderedChat):
            ids, offsets = next(encoded)
            try:
                results[i] = _labelled(result, ids, offsets, tokenizer.bos_token_id, is_prompt=False)
            except TemplateError as exc:
                results[i] = exc
    return results


@dataclass(frozen=True)
class TokenBatch:
    """Many conversations' token ids and labels as flat arrays: row k is ids[bounds[k]:bounds[k+1]].
    What the dataset stage builds Arrow columns from, with no Python list per token."""
    texts: list[str]
    ids: object     # numpy int32
    labels: object  # numpy int32, IGNORE_INDEX where no loss
    bounds: object  # numpy int64, len(texts) + 1


def _chars(encoding, token: int) -> tuple[int, int]:
    chars = encoding.token_to_chars(token)
    return chars if chars is not None else (0, 0)


def _token_at(encoding, chars: range) -> int | None:
    """The first token covering a character of `chars`, scanning in that order."""
    for c in chars:
        token = encoding.char_to_token(c)
        if token is not None:
            return token
    return None


def trained_token_ranges(encoding, spans: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Token index ranges [start, stop) whose tokens lie wholly inside one span: label_tokens' rule,
    found through the encoding's character-to-token map (a few calls per span, not a pass over
    every token's offsets). Offsets are increasing, so a span's tokens are consecutive."""
    ranges = []
    for a, b in spans:
        first, last = _token_at(encoding, range(a, b)), _token_at(encoding, range(b - 1, a - 1, -1))
        if first is None or last is None:
            continue
        while first < n and _chars(encoding, first)[0] < a:  # straddles the span's start
            first += 1
        while last + 1 < n and a <= _chars(encoding, last + 1)[0] < _chars(encoding, last + 1)[1] <= b:
            last += 1  # more tokens of the span's last character (a character split in bytes)
        while last >= first and _chars(encoding, last)[1] > b:  # straddles the span's end
            last -= 1
        if first <= last:
            ranges.append((first, last + 1))
    return ranges


def tokenize_batch(template_source: str, conversations: list[list[dict]], tokenizer,
                   train_on: str = "all_assistant", no_end_of_turn: str = "append_eos",
                   **extra) -> tuple[TokenBatch, list[int | TemplateError]]:
    """tokenize_chats for the dataset path: the same ids and labels (and the same refusals, in
    the same order of checks), as flat arrays. Returns the batch and, per conversation, its row in
    the batch or its TemplateError."""
    import numpy as np

    variables = {**template_tokens(tokenizer), **extra}
    rendered: list[RenderedChat] = []
    outcome: list[int | TemplateError] = []
    for messages in conversations:
        try:
            chat = apply_policy(render_chat(template_source, messages, train_on=train_on, **variables),
                                no_end_of_turn, variables.get("eos_token"))
            outcome.append(len(rendered))
            rendered.append(chat)
        except TemplateError as exc:
            outcome.append(exc)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: the per-row path
        return _batch_from_chats(rendered, tokenizer, outcome)
    encodings = backend.encode_batch([r.text for r in rendered], add_special_tokens=False) if rendered else []
    ids = [e.ids for e in encodings]
    kept, bos = [], tokenizer.bos_token_id
    verdict: list[int | TemplateError] = []
    for k, (chat, encoding, row) in enumerate(zip(rendered, encodings, ids)):
        try:
            check_bos(row[:2], bos)
            ranges = trained_token_ranges(encoding, chat.trained_spans, len(row))
            if not ranges:
                why = ("every trained character shares a token with untrained ones" if chat.trained_spans
                       else "it has no assistant message to train on")
                raise TemplateError(f"no token of this example carries loss: {why}", reason="no_trained_tokens")
            verdict.append(len(kept))
            kept.append((k, ranges))
        except TemplateError as exc:
            verdict.append(exc)
    lengths = np.fromiter((len(ids[k]) for k, _ in kept), dtype=np.int64, count=len(kept))
    bounds = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    flat = np.fromiter(itertools.chain.from_iterable(ids[k] for k, _ in kept), dtype=np.int32, count=int(bounds[-1]))
    trained = np.zeros(len(flat) + 1, dtype=np.int32)  # +1 at a range's start, -1 past its end
    for row, (_, ranges) in enumerate(kept):
        for start, stop in ranges:
            trained[bounds[row] + start] += 1
            trained[bounds[row] + stop] -= 1
    labels = np.where(np.cumsum(trained[:-1]) > 0, flat, np.int32(IGNORE_INDEX)).astype(np.int32)
    batch = TokenBatch([rendered[k].text for k, _ in kept], flat, labels, bounds)
    return batch, [v if isinstance(v, TemplateError) else verdict[v] for v in outcome]


def _batch_from_chats(rendered: list[RenderedChat], tokenizer, outcome: list) -> tuple[TokenBatch, list]:
    import numpy as np

    good: list[TokenizedChat] = []
    rows: list[int | TemplateError] = []  # per rendered chat: its row in the batch, or its refusal
    for chat, (ids, offsets) in zip(rendered, encode_texts(tokenizer, [r.text for r in rendered])):
        try:
            good.append(_labelled(chat, ids, offsets, tokenizer.bos_token_id, is_prompt=False))
            rows.append(len(good) - 1)
        except TemplateError as exc:
            rows.append(exc)
    bounds = np.zeros(len(good) + 1, dtype=np.int64)
    np.cumsum([len(c.input_ids) for c in good], out=bounds[1:])
    flat = np.asarray([t for c in good for t in c.input_ids], dtype=np.int32)
    labels = np.asarray([t for c in good for t in c.labels], dtype=np.int32)
    return TokenBatch([c.text for c in good], flat, labels, bounds), [v if isinstance(v, TemplateError) else rows[v]
                                                                      for v in outcome]

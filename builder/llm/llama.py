"""Talking to an open llama_cpp.Llama: token texts, the chat prompt its chat handler builds, and
batched scoring and greedy generation, several sequences per llama_decode.

    prompt, tokens = format_chat(llm, template, messages, add_generation_prompt=True)
    scorer = BatchScorer(llm)        # [(log P(tokens[first:] | tokens[:first]), greedy?)]
    scores = scorer.score([(tokens, first), ...]); scorer.close()
    generator = BatchGenerator(llm)  # [{text, tokens, stopped, stopped_on}]: create_completion's at temperature 0
    answers = generator.generate([prompt_tokens, ...], [stop_texts, ...], max_tokens); generator.close()

llama_cpp and numpy are imported where they are used, so importing this module costs nothing.
"""
from __future__ import annotations

import os


def token_text(llm, token_id: int) -> str:
    """The text of one token, special tokens included; "" for a token the model lacks (id < 0)."""
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""


def format_chat(llm, template: str, messages: list[dict], add_generation_prompt: bool,
                edit=None) -> tuple[str, list[int]]:
    """What llama-cpp-python's chat handler feeds the model: the GGUF template rendered by its Jinja
    formatter, tokenized with special tokens and no extra BOS (the formatter owns BOS)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=token_text(llm, llm.token_eos()),
                                    bos_token=token_text(llm, llm.token_bos()),
                                    add_generation_prompt=add_generation_prompt)
    result = formatter(messages=messages)
    prompt = edit(result.prompt) if edit else result.prompt  # edit: what training did to the text
    return prompt, llm.tokenize(prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def log_softmax_rows(logits):
    """Each row's log-softmax, in float64 (the sums of many small log-probabilities stay exact)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=1, keepdims=True)
    return logits - (np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)) + peak)


class BatchScorer:
    """Scores several token sequences per llama_decode: a second context on the same loaded model,
    each sequence its own seq_id in one unified KV cache, logits for every token. Sequences are
    packed into batches of at most `capacity` tokens and MAX_SEQUENCES sequences."""

    MAX_SEQUENCES = 16
    LOGITS_BUDGET = 256 * 2**20  # bytes of float32 logits per batch

    def __init__(self, llm):
        import llama_cpp
        from llama_cpp import _internals

        self.llm, self.vocab = llm, llm.n_vocab()
        budget = min(4096, llm._model.n_ctx_train(), self.LOGITS_BUDGET // (4 * self.vocab))
        self.capacity = max(llm.n_ctx(), budget)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.capacity
        params.n_seq_max = self.MAX_SEQUENCES
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=self.capacity, embd=0, n_seq_max=self.MAX_SEQUENCES, verbose=False)

    def score(self, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(log-probability of tokens[first:] given the tokens before, greedy?) for each (tokens, first)."""
        import numpy as np

        results: list = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda k: -len(requests[k][0]))  # longest first: tight batches
        while order:
            picked, used = [], 0
            while order and len(picked) < self.MAX_SEQUENCES and used + len(requests[order[0]][0]) - 1 <= self.capacity:
                used += len(requests[order[0]][0]) - 1
                picked.append(order.pop(0))
            self.batch.reset()
            for seq, k in enumerate(picked):
                self.batch.add_sequence(requests[k][0][:-1], seq, logits_all=True)
            self.ctx.kv_cache_clear()
            self.ctx.decode(self.batch)
            logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(used, self.vocab))
            start = 0
            for k in picked:
                tokens, first = requests[k]
                rows = log_softmax_rows(logits[start + first - 1:start + len(tokens) - 1])
                targets = np.asarray(tokens[first:])
                greedy = bool((rows.argmax(axis=1) == targets).all())
                results[k] = (float(rows[np.arange(len(targets)), targets].sum()), greedy)
                start += len(tokens) - 1
        return results

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


class BatchGenerator(BatchScorer):
    """Greedy generation of several prompts per llama_decode, on the same kind of second context:
    each prompt its own seq_id, then one token per live sequence per decode. A sequence ends at an
    end-of-generation token (stopped), at one of its stop texts (stopped; the text is cut there)
    or after max_tokens (not stopped): what create_completion does with temperature 0, one
    sequence at a time. `stopped_on` says what ended it, which create_completion does not: the
    end-of-generation token's text (`<|im_end|>`, `</s>`), the stop text, or None (max_tokens)."""

    def generate(self, prompts: list[list[int]], stops: list[list[str]], max_tokens: int) -> list[dict]:
        results: list = [None] * len(prompts)
        order = list(range(len(prompts)))
        while order:
            group, used = [], 0
            while (order and len(group) < self.MAX_SEQUENCES
                   and used + len(prompts[order[0]]) + max_tokens <= self.capacity):
                used += len(prompts[order[0]]) + max_tokens
                group.append(order.pop(0))
            if not group:  # one prompt longer than the context: generate nothing, as llama.cpp would refuse
                k = order.pop(0)
                results[k] = {"text": "", "tokens": 0, "stopped": False, "stopped_on": None}
                continue
            made = self._group([prompts[k] for k in group], [stops[k] for k in group], max_tokens)
            for k, result in zip(group, made):
                results[k] = result
        return results

    def _group(self, prompts: list[list[int]], stops: list[list[str]], max_tokens: int) -> list[dict]:
        import llama_cpp
        import numpy as np

        vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.ctx.kv_cache_clear()
        self.batch.reset()
        for seq, prompt in enumerate(prompts):
            self.batch.add_sequence(prompt, seq, logits_all=False)
        self.ctx.decode(self.batch)
        live = list(range(len(prompts)))
        out: list[list[int]] = [[] for _ in prompts]
        done: list[dict | None] = [None] * len(prompts)
        while live:
            logits = np.ctypeslib.as_array(self.ctx.get_logits(), shape=(len(live), self.vocab))
            nexts = []
            for row, seq in enumerate(live):
                token = int(np.argmax(logits[row]))
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    done[seq] = self._result(out[seq], stops[seq], eog=token_text(self.llm, token))
                    continue
                out[seq].append(token)
                text = self._text(out[seq])
                if any(stop in text for stop in stops[seq]) or len(out[seq]) >= max_tokens:
                    done[seq] = self._result(out[seq], stops[seq])
                else:
                    nexts.append(seq)
            live = nexts
            if live:
                self._next_batch(prompts, out, live)
        return done  # type: ignore[return-value]

    def _next_batch(self, prompts: list[list[int]], out: list[list[int]], live: list[int]) -> None:
        """Decode the last token of every live sequence, each at its own position."""
        self.batch.reset()
        for i, seq in enumerate(live):
            b = self.batch.batch
            b.token[i], b.pos[i] = out[seq][-1], len(prompts[seq]) + len(out[seq]) - 1
            b.seq_id[i][0], b.n_seq_id[i], b.logits[i] = seq, 1, True
        self.batch.batch.n_tokens = len(live)
        self.ctx.decode(self.batch)

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="ignore")

    def _result(self, tokens: list[int], stops: list[str], eog: str | None = None) -> dict:
        """The answer, cut at its first stop text. It stopped on the end-of-generation token `eog`,
        else on that stop text, else (neither: max_tokens) not at all."""
        text = self._text(tokens)
        cuts = sorted((text.index(stop), stop) for stop in stops if stop in text)
        stopped_on = eog if eog is not None else cuts[0][1] if cuts else None
        return {"text": text[:cuts[0][0]] if cuts else text, "tokens": len(tokens),
                "stopped": stopped_on is not None, "stopped_on": stopped_on}

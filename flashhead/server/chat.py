"""Chat messages to prompt text with the GGUF's own chat template.

The template is the GGUF's ``tokenizer.chat_template`` (Jinja, rendered in a sandbox as transformers and
llama-cpp-python do). A GGUF without one (the built-in Gemma-3-270M) gets llama.cpp's built-in template
for its architecture family, when llama.cpp has one; otherwise chat endpoints answer 400.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from ..integrations.llamacpp import LlamaCpp, gguf_head


class NoChatTemplate(ValueError):
    """The model has no chat template: only plain completions work."""


class ChatTemplate:
    """``render(messages)`` gives the prompt text, generation prompt included."""

    def __init__(self, engine: LlamaCpp) -> None:
        self.engine = engine
        _, meta = gguf_head(engine.path)
        self.source = meta.get("tokenizer.chat_template")
        arch = str(meta.get("general.architecture", ""))
        self._builtin = None
        if not self.source:
            names = _builtin_names(engine)
            self._builtin = next((n for n in names if arch.startswith(n)), None)
        self._jinja = None
        if self.source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._jinja = env.from_string(self.source)
        ll, vocab = engine.ll, engine._vocab
        self._bos = _token_text(engine, ll.llama_vocab_bos(vocab))
        self._eos = _token_text(engine, ll.llama_vocab_eos(vocab))

    @property
    def available(self) -> bool:
        return self._jinja is not None or self._builtin is not None

    def render(self, messages: Sequence[dict]) -> str:
        if self._jinja is not None:
            return self._jinja.render(messages=list(messages), add_generation_prompt=True, bos_token=self._bos,
                                      eos_token=self._eos)
        if self._builtin is None:
            raise NoChatTemplate(f"{self.engine.path.name} has no chat template and llama.cpp has no built-in one "
                                 "for it: use /v1/completions or /api/generate with raw=true")
        return self._llamacpp_render(messages)

    def _llamacpp_render(self, messages: Sequence[dict]) -> str:
        ll = self.engine.ll
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (ll.llama_chat_message * len(keep))(*[ll.llama_chat_message(r, c) for r, c in keep])
        size = 4 * sum(len(r) + len(c) for r, c in keep) + 256
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_chat_apply_template(self._builtin.encode(), chat, len(keep), True, buf, size)
            if n < 0:
                raise NoChatTemplate(f"llama.cpp's built-in template {self._builtin!r} failed ({n})")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise RuntimeError("llama_chat_apply_template kept growing")


def _builtin_names(engine: LlamaCpp) -> list[str]:
    ll = engine.ll
    n = ll.llama_chat_builtin_templates(None, 0)
    arr = (ctypes.c_char_p * n)()
    ll.llama_chat_builtin_templates(arr, n)
    return sorted((x.decode() for x in arr if x), key=len, reverse=True)  # longest first: gemma3 before gemma


def _token_text(engine: LlamaCpp, token: int) -> str:
    if token < 0:
        return ""
    buf = ctypes.create_string_buffer(64)
    n = engine.ll.llama_token_to_piece(engine._vocab, token, buf, 64, 0, True)
    return buf.raw[:max(n, 0)].decode("utf-8", errors="replace")


def _raise(message: str):
    raise ValueError(message)

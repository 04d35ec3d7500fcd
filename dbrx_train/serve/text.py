"""Text around the model: tokens to text and back, chat prompts, and streaming text that stops at
stop strings."""

from __future__ import annotations

import codecs
from typing import Iterable

from dbrx_train.chat_template import ChatTemplateName, chat_ids


class TextCodec:
    """A tiktoken encoding, as the server uses it. Ids without a token (the model's vocabulary is
    padded past the tokenizer's) decode to nothing instead of failing."""

    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        """Prompt text, with special tokens written as text (`<|im_start|>`) read as those tokens."""
        return self.encoding.encode(text, allowed_special='all')

    def encode_ordinary(self, text: str) -> list[int]:
        """Text a user wrote inside a message: special-token text stays plain text."""
        return self.encoding.encode_ordinary(text)

    def token_bytes(self, token: int) -> bytes:
        try:
            return self.encoding.decode_single_token_bytes(token)
        except KeyError:
            return b''

    def token_str(self, token: int) -> str:
        return self.token_bytes(token).decode('utf-8', errors='replace')

    def decode(self, tokens: Iterable[int]) -> str:
        return b''.join(self.token_bytes(t) for t in tokens).decode('utf-8', errors='replace')


def chat_prompt(codec: TextCodec, messages: list[tuple[str, str]], template: ChatTemplateName = 'chatml') -> list[int]:
    """Token ids of `messages` rendered with `template` and its generation prompt. The special tokens
    are placed by id, so a message cannot forge `<|im_end|>` or a turn of another role."""
    return chat_ids(messages, template, codec.encode_ordinary, add_generation_prompt=True)[0]


def chatml_prompt(codec: TextCodec, messages: list[tuple[str, str]]) -> list[int]:
    """`chat_prompt` with plain ChatML (`tokenizer.CHATML_TEMPLATE`)."""
    return chat_prompt(codec, messages, 'chatml')


class TextStream:
    """Generated tokens in, text out. `pending()` returns only text that is final: it holds back an
    incomplete UTF-8 character and any tail that could still grow into a stop string."""

    def __init__(self, codec: TextCodec, stop: tuple[str, ...] = ()):
        self.codec = codec
        self.stop = stop
        self.text = ''
        self._sent = 0
        self._decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')

    def push(self, token: int) -> bool:
        """Appends a token's text; True when a stop string appeared (the text then ends before it)."""
        before = len(self.text)
        self.text += self._decoder.decode(self.codec.token_bytes(token))
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def pending(self, final: bool = False) -> str:
        """The text not returned before; with `final`, all of it (the sequence has ended)."""
        if final:
            self.text += self._decoder.decode(b'', final=True)
            end = len(self.text)
        else:
            end = len(self.text) - self._held_back()
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        longest = max((len(s) for s in self.stop), default=1) - 1
        for k in range(min(longest, len(self.text) - self._sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

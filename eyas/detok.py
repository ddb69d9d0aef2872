"""Incremental detokenization with stop strings, for streaming text deltas.

Decoding a token alone is wrong in two ways: a byte-level token may hold half of a UTF-8
character (it decodes to U+FFFD until the rest arrives), and SentencePiece-style tokenizers drop
a word's leading space at the start of a decode. So, as vLLM does, each step decodes a short
window `ids[prefix:]` and emits only what it adds to `ids[prefix:read]`:

    ids:   ... p p p | r r | n          prefix..read: already emitted, kept as context
                     ^prefix ^read      new text = decode(prefix..) - decode(prefix..read)

The window only spans the last emitted piece plus tokens still waiting, so a step costs
O(new tokens), not O(output length). While the decoded tail ends in U+FFFD the offsets stay
put and the text is held back.

Stop strings (not included in the output, as in vLLM) are searched only in the new text plus
an overlap. Text that could be the start of a stop string is held back until the next tokens
show it is not one, so a delta never carries text that a later stop would cut.
"""
from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as context before the first output token
_COMPACT_AT = 4096  # drop ids before the window once this many have piled up


def find_stop(text: str, prev_len: int, stops: Sequence[str]) -> Optional[int]:
    """Index in text of the earliest stop string that ends after text[:prev_len], or None.

    Assumes text[:prev_len] holds no whole stop string (it was checked before).
    """
    best = None
    for stop in stops:
        i = text.find(stop, max(0, prev_len - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string.

    "hello wor", stops ["world"] -> 3 ("wor" may become "world": hold it back).
    """
    hold = 0
    for stop in stops:
        for j in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:j]):
                hold = j
                break
    return hold


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, stopping at stop strings.

    `push(ids)` returns `(delta, stopped)`. Once stopped, the output text ends just before the
    stop string (`stop_str` names it) and later pushes return ("", True). `consumed` is how many
    ids of the last push were used: on a stop, the ids after the one that completed it are
    surplus (several ids arrive at once under speculative decoding).
    Call `push([], final=True)` (or `flush()`) when the request ends for another reason, to
    release text held back for an unfinished character or a possible stop string.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stops = tuple(stop)
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A prompt ending mid-character would swallow the output's first bytes: drop that tail.
        while self._ids and self._decode(self._ids).endswith(REPLACEMENT_CHAR):
            self._ids.pop()
        self._prefix = 0  # window start: context for the next decode
        self._read = len(self._ids)  # ids before this are decoded into _decoded
        self._decoded = ""  # output text of ids[:read] (cut at a stop string once stopped)
        self._emitted = 0  # chars of _decoded returned in deltas so far
        self.stopped = False
        self.stop_str: Optional[str] = None
        self.consumed = 0

    @property
    def text(self) -> str:
        """The output text returned so far: all deltas concatenated."""
        return self._decoded[:self._emitted]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _advance(self, final: bool) -> str:
        """Decode the pending window; return the new complete text (all of it when final)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing to show yet
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # unfinished UTF-8 character: wait for its next bytes
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > _COMPACT_AT:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text[len(prefix_text):]

    def _take(self, piece: str) -> bool:
        """Append piece to the decoded text; on a stop string, cut there and return True."""
        old_len = len(self._decoded)
        self._decoded += piece
        if not self.stops or not piece:
            return False
        i = find_stop(self._decoded, old_len, self.stops)
        if i is None:
            return False
        self.stop_str = next(s for s in self.stops if self._decoded.startswith(s, i))
        self._decoded = self._decoded[:i]
        self.stopped = True
        return True

    def push(self, new_token_ids: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Add output ids; return (text delta, stopped)."""
        self.consumed = 0
        if self.stopped:
            return "", True
        for n, token_id in enumerate(new_token_ids):
            self._ids.append(int(token_id))
            self.consumed = n + 1
            if self._take(self._advance(final and n == len(new_token_ids) - 1)):
                break
        if final and not self.stopped and not new_token_ids:
            self._take(self._advance(final=True))
        end = len(self._decoded)
        if not (final or self.stopped):
            end -= partial_stop_len(self._decoded[self._emitted:], self.stops)
        delta = self._decoded[self._emitted:end]
        self._emitted = end
        return delta, self.stopped

    def flush(self) -> str:
        """Release everything held back (the request ended without a stop string)."""
        return self.push([], final=True)[0]

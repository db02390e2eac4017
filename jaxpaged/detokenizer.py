"""Incremental detokenization and stop strings. Host-side, no JAX.

`tokenizers.decoders.DecodeStream` holds back bytes until they form whole UTF-8 characters, so a
multi-byte character split over tokens is never emitted in halves. It is primed with the tail of
the prompt so the first generated token decodes with its real left context (leading spaces of
sentencepiece vocabularies).
"""

from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool,
                 stop_strings: tuple[str, ...] = (), include_stop_str_in_output: bool = False):
        # transformers' fast tokenizers wrap a `tokenizers.Tokenizer` as `_tokenizer`.
        self._backend = getattr(tokenizer, "_tokenizer", tokenizer)
        self._stream = DecodeStream(ids=list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]),
                                    skip_special_tokens=skip_special_tokens)
        self.stop_strings = stop_strings
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""

    def add_token(self, token_id: int) -> str | None:
        """Appends one token's text; returns the stop string it completed, if any.

        On a stop the text is cut before the stop string (or after it, when asked to include it).
        """
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None
        start = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0) + 1)
        self.text += piece
        found = [(self.text.find(stop, start), stop) for stop in self.stop_strings]
        found = [(index, stop) for index, stop in found if index != -1]
        if not found:
            return None
        index, stop = min(found)  # the earliest stop wins
        end = index + len(stop) if self.include_stop_str_in_output else index
        self.text = self.text[:end]
        return stop

"""Structured output through llguidance: a request's `response_format` as a grammar, checked where the
request is served (a bad one is the client's error, before it costs the engine anything) and followed by
the engine, which masks each constrained row's next-token choice to what the grammar allows.

llguidance works on its own view of the tokenizer (`LLTokenizer`: about a second to build for a large
vocabulary), made once per process when the first constrained request comes, off the event loop. Nothing
here imports torch: HTTP workers check grammars too.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import structlog
from transformers import PreTrainedTokenizerFast

from trickle.generation.params import ResponseFormat
from trickle.generation.prompts import RequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

FIELD = "response_format"
log = structlog.get_logger(__name__)


# JSON as `json.dumps` writes it (", " and ": " between items, no other whitespace): a model may not pad
# its output with whitespace until it runs out of tokens, which a weak one does.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


def grammar_of(spec: ResponseFormat) -> str:
    """The llguidance grammar of a response format."""
    match spec.type:
        case "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        case "json_schema":
            schema = json.dumps(spec.json_schema)
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        case "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.pattern or "")
        case _:
            return llguidance.LLMatcher.grammar_from_lark(spec.grammar or "")


class Grammars:
    """llguidance's view of one tokenizer, made on first use (thread-safe), and the grammars of requests.
    `vocab_size` is the model's (its logits may have more entries than the tokenizer has tokens);
    `eos_ids` the tokens that end a sentence of the grammar."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        vocab_size: int | None = None,
        eos_ids: list[int] | None = None,
    ) -> None:
        self._source, self.vocab_size, self._eos_ids = tokenizer, vocab_size, eos_ids
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        # Each format's matcher at its start, compiled once: a request's is a copy (~1,000x cheaper
        # than compiling again; the engine thread makes them). The least recently used go first.
        self._started: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Made on first use; an exception if llguidance cannot read the tokenizer (every use raises)."""
        with self._lock:
            if self._tokenizer is None:
                backend = self._source.backend_tokenizer
                eos: Any = self._eos_ids or self._source.eos_token_id
                self._tokenizer = llguidance.LLTokenizer(
                    _serialized(backend), n_vocab=self.vocab_size, eos_token=eos
                )
            return self._tokenizer

    def prepare_in_background(self) -> threading.Thread:
        """Make llguidance's view of the tokenizer now, on a thread of its own (a second or so for a large
        vocabulary), so the first constrained request does not wait for it where it comes (on the engine
        thread, every stream would)."""
        thread = threading.Thread(target=self._prepare, name="trickle-grammars", daemon=True)
        thread.start()
        return thread

    def _prepare(self) -> None:
        try:
            self.tokenizer  # noqa: B018 (made on first use)
        except Exception as err:  # requests with a response format will be refused, saying why
            log.warning(
                "structured output unavailable: llguidance cannot read the tokenizer", error=str(err)[:200]
            )

    def check(self, spec: ResponseFormat) -> None:
        """RequestError naming `response_format` when llguidance cannot follow it (a schema it cannot
        compile, a regular expression or grammar that does not parse)."""
        try:
            grammar = grammar_of(spec)
        except (ValueError, TypeError) as err:
            raise RequestError(FIELD, _brief(str(err))) from err
        try:
            tokenizer = self.tokenizer
        except Exception as err:  # llguidance cannot read this model's tokenizer: no request can have it
            message = f"structured output is not available for this model's tokenizer ({_brief(str(err))})"
            raise RequestError(FIELD, message) from err
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise RequestError(FIELD, _brief(error))

    STARTED = 256  # formats whose compiled matchers are kept

    def matcher(self, spec: ResponseFormat) -> llguidance.LLMatcher:
        """A matcher of the grammar at its start (checked grammars only)."""
        key = spec.model_dump_json()
        with self._lock:
            started = self._started.pop(key, None)
        if started is None:
            started = llguidance.LLMatcher(self.tokenizer, grammar_of(spec))
        with self._lock:
            self._started[key] = started
            while len(self._started) > self.STARTED:
                self._started.popitem(last=False)
        return started.deep_copy()


def _serialized(backend: Any) -> str:
    """The backend tokenizer as JSON, without padding or truncation (llguidance reads the vocabulary and
    the pre-tokenizer from it)."""
    copy = backend.__class__.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return str(copy.to_str())


def _brief(message: str) -> str:
    first = message.strip().splitlines()[0] if message.strip() else "invalid"
    return first[:300]

"""Log-probabilities in each dialect's shape, from the engine's `TokenLogprobs`: the native events'
entries, OpenAI chat's `logprobs.content` and OpenAI completions' legacy `logprobs` object. A token's
text is what it decodes to on its own (`Prompts.token_text`), as other servers report it; OpenAI chat's
`bytes` are the bytes the token stands for (`Prompts.token_bytes`: a token that holds part of a character
has those bytes, where its text is U+FFFD)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from trickle.generation import Prompts
from trickle.generation.messages import TokenLogprobs


class NativeAlternative(BaseModel):
    token: str
    id: int
    logprob: float


class NativeLogprob(NativeAlternative):
    """A generated token's log-probability (the model's, before temperature and penalties) and the most
    likely tokens' at its place, most likely first."""

    top: list[NativeAlternative]


def native(prompts: Prompts, entries: list[TokenLogprobs]) -> list[dict[str, Any]]:
    text = prompts.token_text
    return [
        {
            "token": text(entry.token),
            "id": entry.token,
            "logprob": entry.logprob,
            "top": [
                {"token": text(token), "id": token, "logprob": logprob}
                for token, logprob in zip(entry.top_ids, entry.top_logprobs, strict=True)
            ],
        }
        for entry in entries
    ]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI chat's `choices[].logprobs`."""

    content: list[TokenLogprob] | None


def _top(prompts: Prompts, token: int, logprob: float) -> dict[str, Any]:
    return {"token": prompts.token_text(token), "logprob": logprob, "bytes": list(prompts.token_bytes(token))}


def chat(prompts: Prompts, entries: list[TokenLogprobs]) -> ChatLogprobs:
    return ChatLogprobs.model_validate(
        {
            "content": [
                {
                    **_top(prompts, entry.token, entry.logprob),
                    "top_logprobs": [
                        _top(prompts, token, logprob)
                        for token, logprob in zip(entry.top_ids, entry.top_logprobs, strict=True)
                    ],
                }
                for entry in entries
            ]
        }
    )


class CompletionLogprobs(BaseModel):
    """OpenAI completions' `choices[].logprobs` (the legacy shape)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def completion(prompts: Prompts, entries: list[TokenLogprobs], offset: int) -> CompletionLogprobs:
    """`offset`: where the first token's text begins in the completion's text (the characters sent
    before)."""
    text = prompts.token_text
    tokens = [text(entry.token) for entry in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[
            {text(token): logprob for token, logprob in zip(entry.top_ids, entry.top_logprobs, strict=True)}
            for entry in entries
        ],
        text_offset=offsets,
    )

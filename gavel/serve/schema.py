"""The wire format of `gavel serve`: OpenAI chat-completion requests and responses, and gavel's `gavel` extension.

Requests accept the OpenAI fields gavel serves and reject any other with an error that names it; responses are
the standard `chat.completion` / `chat.completion.chunk` shapes plus one `gavel` field (see docs/serve.md).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

FinishReason = Literal["stop", "length", "content_filter"]


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests
class TextPart(_Forbid):
    """A content part of a message; only text is served."""

    type: Literal["text"]
    text: str


class ChatMessage(_Forbid):
    """One message; `developer` reads as `system`, content parts are joined."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Forbid):
    include_usage: bool = False


class ChatCompletionRequest(_Forbid):
    """POST /v1/chat/completions. `temperature` 0 decodes greedily (OpenAI's default, 1, samples)."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("n must be 1: gavel serve returns one choice per request")
        return n

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# ---- the gavel extension
class GavelEvent(_Forbid):
    """A rule firing: the rule, its action, where (prompt or reply, token index and text) and the CEs above
    threshold there."""

    rule: str
    title: str
    severity: str
    action: str
    kind: str
    where: Literal["prompt", "reply"]
    token_index: int
    token: str
    ces: dict[str, float]
    message: str | None = None


class GavelResult(_Forbid):
    """On a completion and on the last chunk of a stream: the verdict (the strongest action taken), whether a rule
    stopped the reply, what the model generated (up to the blocking token) and every rule firing."""

    verdict: str
    blocked: bool
    failed: bool
    generated: str
    events: list[GavelEvent]


class GavelFired(_Forbid):
    """On a streamed chunk: rules that first held at this token."""

    fired: list[str]
    token_index: int


# ---- responses
class Usage(_Forbid):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Forbid):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class Choice(_Forbid):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Forbid):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    gavel: GavelResult | None = None


class Delta(_Forbid):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler) -> dict[str, Any]:   # OpenAI sends only the keys a delta carries
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(_Forbid):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Forbid):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    gavel: GavelResult | GavelFired | None = None


class ModelCard(_Forbid):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gavel"


class ModelList(_Forbid):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Forbid):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Forbid):
    error: ErrorBody


class Health(_Forbid):
    status: Literal["ok"] = "ok"
    model: str
    guarded: bool
    queued: int     # requests waiting for or holding the model

"""``/v1/chat/completions`` request, response and stream chunk."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.openai.common import (
    CompletionUsage,
    LogitBias,
    MaxTokens,
    MinP,
    N,
    Penalty,
    RepetitionPenalty,
    Seed,
    Stop,
    StreamOptions,
    Temperature,
    TopK,
    TopP,
)
from schemas.openai.tools import MAX_TOOLS, ChatTool, FunctionName, MessageToolCall, ToolChoice

# ---- content parts (tagged by "type") ------------------------------------------------------------------


class TextPart(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    """A text content part."""

    text: str


class ImageUrlPart(msgspec.Struct, tag_field="type", tag="image_url", kw_only=True):
    """An image part (decoded so the server can answer that it is unsupported)."""

    image_url: dict[str, Any]


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio", kw_only=True):
    """An audio part (unsupported)."""

    input_audio: dict[str, Any]


class FilePart(msgspec.Struct, tag_field="type", tag="file", kw_only=True):
    """A file part (unsupported)."""

    file: dict[str, Any]


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal", kw_only=True):
    """An assistant refusal part."""

    refusal: str


UserPart = TextPart | ImageUrlPart | InputAudioPart | FilePart
AssistantPart = TextPart | RefusalPart

# ---- messages (tagged by "role") -----------------------------------------------------------------------


class SystemMessage(msgspec.Struct, tag_field="role", tag="system", kw_only=True):
    """Instructions from the operator."""

    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(msgspec.Struct, tag_field="role", tag="developer", kw_only=True):
    """Instructions from the developer (rendered like a system message)."""

    content: str | list[TextPart]
    name: str | None = None


class UserMessage(msgspec.Struct, tag_field="role", tag="user", kw_only=True):
    """A user turn."""

    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(msgspec.Struct, tag_field="role", tag="assistant", kw_only=True):
    """A previous assistant turn (or a prefix to continue with ``continue_final_message``)."""

    content: str | list[AssistantPart] | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    function_call: dict[str, Any] | None = None


class ToolMessage(msgspec.Struct, tag_field="role", tag="tool", kw_only=True):
    """A tool result."""

    content: str | list[TextPart]
    tool_call_id: str


class FunctionMessage(msgspec.Struct, tag_field="role", tag="function", kw_only=True):
    """A deprecated function result."""

    content: str | None
    name: str


ChatMessage = SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage


# ---- response_format (tagged by "type") ----------------------------------------------------------------


class ResponseFormatText(msgspec.Struct, tag_field="type", tag="text", kw_only=True):
    """``{"type": "text"}``: plain text (the default)."""


class ResponseFormatJSONObject(msgspec.Struct, tag_field="type", tag="json_object", kw_only=True):
    """``{"type": "json_object"}``: any JSON object."""


class JSONSchema(msgspec.Struct, kw_only=True):
    """The schema of ``{"type": "json_schema", ...}`` output; ``schema`` left out means any JSON object."""

    name: FunctionName
    description: str | None = None
    schema: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    strict: bool | None = None


class ResponseFormatJSONSchema(msgspec.Struct, tag_field="type", tag="json_schema", kw_only=True):
    """``{"type": "json_schema", "json_schema": {...}}``: JSON following a schema.

    ``json_schema`` is optional in the type only so that its absence is refused naming ``response_format`` when
    the output constraint is built.
    """

    json_schema: JSONSchema | None = None


ResponseFormat = ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema


# ---- request -------------------------------------------------------------------------------------------


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """The body of ``POST /v1/chat/completions``; unknown fields are ignored."""

    messages: list[ChatMessage]
    model: str
    audio: dict[str, Any] | None = None
    frequency_penalty: Penalty | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    max_completion_tokens: MaxTokens | None = None
    max_tokens: MaxTokens | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    moderation: Any | None = None
    n: N | None = None
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: Penalty | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: Any | None = None
    prompt_cache_retention: str | None = None
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = None
    seed: Seed | None = None
    service_tier: str | None = None
    stop: Stop | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    tool_choice: ToolChoice | None = None
    tools: Annotated[list[ChatTool], Meta(max_length=MAX_TOOLS)] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    top_p: TopP | None = None
    user: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    # Extensions (vLLM-compatible names).
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    ignore_eos: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra variables for the chat template (e.g. ``{"enable_thinking": false}``); forwarded as is upstream."""

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The max tokens the client asked for and the field it came from: ``max_completion_tokens`` (the current
        name) wins over the deprecated ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


# ---- response ------------------------------------------------------------------------------------------


class TopLogprob(msgspec.Struct, kw_only=True):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobContent(msgspec.Struct, kw_only=True):
    """One output token: its text, log probability, UTF-8 bytes and the most likely alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    """``choices[].logprobs``: one entry per output token; the tokens' texts join to the content."""

    content: list[TokenLogprobContent] | None
    refusal: list[TokenLogprobContent] | None = None


class FunctionCall(msgspec.Struct, kw_only=True):
    """The function a tool call invokes; ``arguments`` is JSON text."""

    name: str
    arguments: str


class ToolCall(msgspec.Struct, kw_only=True):
    """A tool call in a generated message."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(msgspec.Struct, kw_only=True):
    """The generated assistant message (``tool_calls`` only when the model called tools).

    ``reasoning_content`` (vLLM's name) is present only for a model whose reasoning is parsed out of its output:
    the text between its reasoning markers, or ``None`` when it did not reason.
    """

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET
    reasoning_content: str | msgspec.UnsetType | None = msgspec.UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    """One completion choice."""

    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(msgspec.Struct, kw_only=True):
    """The non-streaming response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ChoiceDeltaFunction(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A tool call's function as streamed: the name once, then argument fragments."""

    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A streamed piece of tool call ``index``: its id, type and name first, then argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaFunction | None = None


class ChoiceDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a stream chunk adds to a choice: the role first, then reasoning, content or tool-call pieces."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None
    reasoning_content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    """A choice inside a stream chunk."""

    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One streamed chunk; ``usage`` is present only when ``stream_options.include_usage`` was set."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | msgspec.UnsetType | None = msgspec.UNSET

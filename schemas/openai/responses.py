"""``/v1/responses``: the request, its input items, the response object, its output items and stream events.

``input`` and ``tools`` are decoded item by item (``server.serving.responses``) rather than by one tagged union:
OpenAI's input messages may leave out their ``type``, and an item of a kind this server does not run (an image, a
hosted tool) gets a 400 naming it instead of a decoder error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.openai.common import MaxTokens, Temperature, TopP
from schemas.openai.tools import FunctionName

MetadataMap = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]], Meta(max_length=16)
]
"""Up to 16 string pairs (keys up to 64 characters, values up to 512), as OpenAI allows."""

ItemId = Annotated[str, Meta(max_length=128)]
"""An item's id (this server's are under 40 characters)."""
CallId = Annotated[str, Meta(min_length=1, max_length=128)]
"""A function call's ``call_id``."""
ItemStatus = Annotated[str, Meta(max_length=16)]

ResponseStatus = Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]


# ---- input items ---------------------------------------------------------------------------------------------
class InputText(msgspec.Struct, tag_field="type", tag="input_text", kw_only=True):
    """Text in an input message."""

    text: str


class OutputText(msgspec.Struct, tag_field="type", tag="output_text", kw_only=True):
    """Text the model wrote (an output message's part, or an earlier assistant turn given as input)."""

    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class Refusal(msgspec.Struct, tag_field="type", tag="refusal", kw_only=True):
    """An assistant refusal."""

    refusal: str


class InputImage(msgspec.Struct, tag_field="type", tag="input_image", kw_only=True):
    """An image (decoded so the server can answer that it is unsupported)."""

    image_url: str | None = None
    file_id: str | None = None
    detail: str | None = None


class InputFile(msgspec.Struct, tag_field="type", tag="input_file", kw_only=True):
    """A file (decoded so the server can answer that it is unsupported)."""

    file_id: str | None = None
    file_data: str | None = None
    filename: str | None = None


class InputAudio(msgspec.Struct, tag_field="type", tag="input_audio", kw_only=True):
    """Audio (decoded so the server can answer that it is unsupported)."""

    input_audio: dict[str, Any] | None = None


ContentPart = InputText | OutputText | Refusal | InputImage | InputFile | InputAudio


class MessageItem(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    """A message: the user's, the instructions' (``system``, ``developer``) or an earlier assistant turn."""

    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: ItemId | None = None
    status: ItemStatus | None = None


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    """A function call the model made (in the output, or given back as input)."""

    call_id: CallId
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    arguments: str
    id: ItemId | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(msgspec.Struct, tag_field="type", tag="function_call_output", kw_only=True):
    """The result of a function call, answering ``call_id``."""

    call_id: CallId
    output: str | list[ContentPart]
    id: ItemId | None = None
    status: ItemStatus | None = None


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text", kw_only=True):
    """The text of a reasoning model's thinking."""

    text: str


class ReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    """A reasoning model's thinking before its answer (given back as input, it is not shown to the model again)."""

    id: str | None = None
    summary: list[Any] = msgspec.field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class ItemReference(msgspec.Struct, tag_field="type", tag="item_reference", kw_only=True):
    """A reference to an item by id (decoded so the server can answer that it is unsupported)."""

    id: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | ItemReference
"""An item of ``input`` (decoded one by one: a message may leave out its ``type``)."""


# ---- tools and text format -----------------------------------------------------------------------------------
class FunctionToolSpec(msgspec.Struct, kw_only=True):
    """``{"type": "function", "name", "description", "parameters", "strict"}``: a function the model may call."""

    name: FunctionName
    type: Literal["function"] = "function"
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(msgspec.Struct, kw_only=True):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (with ``name``, ``schema``, ``strict``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: FunctionName | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True):
    """``text``: the output's format (and OpenAI's ``verbosity``, which this server does not support)."""

    format: TextFormat | None = None
    verbosity: str | None = None


# ---- request ---------------------------------------------------------------------------------------------------
class ResponsesRequest(msgspec.Struct, kw_only=True):
    """The body of ``POST /v1/responses``; unknown fields are ignored, known ones this server lacks get a 400."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool = True
    metadata: MetadataMap | None = None
    previous_response_id: str | None = None
    user: str | None = None
    stream: bool = False
    background: bool = False
    stream_options: dict[str, Any] | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Known parameters this server does not implement (a 400 names each one that is set).
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    context_management: Any | None = None


# ---- the response object -----------------------------------------------------------------------------------
class OutputMessage(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    """An assistant message in the output."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    """A function call in the output: answer it with a ``function_call_output`` item carrying ``call_id``."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class OutputReasoning(msgspec.Struct, tag_field="type", tag="reasoning", kw_only=True):
    """A reasoning model's thinking, as ``reasoning_text`` content."""

    id: str
    summary: list[Any] = msgspec.field(default_factory=list)
    content: list[ReasoningText] = msgspec.field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(msgspec.Struct, kw_only=True):
    """``cached_tokens``: input tokens served from the prefix cache."""

    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    """``reasoning_tokens``: output tokens spent reasoning."""

    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    """Token counts measured with the model's tokenizer (the whole rebuilt conversation counts as input)."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(msgspec.Struct, kw_only=True):
    """Why a response failed."""

    code: str
    message: str


class IncompleteDetails(msgspec.Struct, kw_only=True):
    """Why a response is incomplete (``max_output_tokens``)."""

    reason: str


class ReasoningConfig(msgspec.Struct, kw_only=True):
    """``reasoning`` as echoed in a response (this server takes no reasoning options)."""

    effort: str | None = None
    summary: str | None = None


class TextSettings(msgspec.Struct, kw_only=True):
    """``text`` as echoed in a response."""

    format: TextFormat


class Response(msgspec.Struct, kw_only=True):
    """A model response: what was asked (echoed), its output items, status and usage."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None = None
    reasoning: ReasoningConfig = msgspec.field(default_factory=ReasoningConfig)
    store: bool
    temperature: float | None = None
    text: TextSettings
    tool_choice: str | dict[str, Any]
    tools: list[FunctionToolSpec]
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    completed_at: int | None = None


class DeletedResponse(msgspec.Struct, kw_only=True):
    """The answer to ``DELETE /v1/responses/{id}``."""

    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItemList(msgspec.Struct, kw_only=True):
    """A page of a response's input items (``GET /v1/responses/{id}/input_items``)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---- stream events -------------------------------------------------------------------------------------------
class _Event(msgspec.Struct, kw_only=True, tag_field="type"):
    sequence_number: int = 0


class ResponseCreated(_Event, tag="response.created"):
    response: Response


class ResponseInProgress(_Event, tag="response.in_progress"):
    response: Response


class ResponseCompleted(_Event, tag="response.completed"):
    response: Response


class ResponseIncomplete(_Event, tag="response.incomplete"):
    response: Response


class ResponseFailed(_Event, tag="response.failed"):
    response: Response


class OutputItemAdded(_Event, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class OutputItemDone(_Event, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class ContentPartAdded(_Event, tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class ContentPartDone(_Event, tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class OutputTextDelta(_Event, tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputTextDone(_Event, tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningTextDelta(_Event, tag="response.reasoning_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningTextDone(_Event, tag="response.reasoning_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str


class FunctionCallArgumentsDelta(_Event, tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDone(_Event, tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event, tag="error"):
    """A failure after the stream began (``response.failed`` follows with the response)."""

    code: str | None
    message: str
    param: str | None = None


ResponseEvent = (
    ResponseCreated
    | ResponseInProgress
    | ResponseCompleted
    | ResponseIncomplete
    | ResponseFailed
    | OutputItemAdded
    | OutputItemDone
    | ContentPartAdded
    | ContentPartDone
    | OutputTextDelta
    | OutputTextDone
    | ReasoningTextDelta
    | ReasoningTextDone
    | FunctionCallArgumentsDelta
    | FunctionCallArgumentsDone
    | ErrorEvent
)

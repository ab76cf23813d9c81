"""One turn of a Responses conversation: its items, the chat request that runs it, and the response it becomes.

:func:`begin_turn` checks a request and joins the earlier turn's items (``previous_response_id``, loaded by the
caller) with its ``input``; :meth:`Turn.response` renders the response object in any state, and
:func:`output_of` turns a finished chat completion into output items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from schemas.openai.chat import ChatCompletion, ChatCompletionMessage, ChatCompletionRequest
from schemas.openai.common import CompletionTokensDetails, CompletionUsage, PromptTokensDetails
from schemas.openai.responses import (
    FunctionToolSpec,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningText,
    Response,
    ResponseError,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    TextFormat,
    TextSettings,
)
from server.serving.responses.items import item_id, parse_input, to_messages, with_ids
from server.serving.responses.translate import chat_request, function_tools, reject_unsupported


@dataclass(slots=True)
class Turn:
    """A checked Responses request, ready to run as ``chat``.

    Attributes:
        id: The response id (``resp_…``).
        created_at: When it was created (Unix seconds).
        model: The served model's name.
        request: The request as decoded.
        tools: Its function tools.
        items: The conversation's input items with ids: the earlier turn's input and output, then this input.
        chat: The chat completion request that runs the turn.
    """

    id: str
    created_at: int
    model: str
    request: ResponsesRequest
    tools: list[FunctionToolSpec]
    items: list[InputItem]
    chat: ChatCompletionRequest

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputItem] | None = None,
        usage: ResponseUsage | None = None,
        *,
        error: ResponseError | None = None,
        incomplete: str | None = None,
    ) -> Response:
        """The response object in ``status``, echoing what was asked."""
        req = self.request
        fmt = req.text.format if req.text is not None and req.text.format is not None else TextFormat(type="text")
        return Response(
            id=self.id,
            created_at=self.created_at,
            status=status,
            background=req.background,
            error=error,
            incomplete_details=IncompleteDetails(reason=incomplete) if incomplete is not None else None,
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            model=self.model,
            output=output or [],
            parallel_tool_calls=req.parallel_tool_calls is not False,
            previous_response_id=req.previous_response_id,
            store=req.store,
            temperature=req.temperature if req.temperature is not None else 1.0,
            text=TextSettings(format=fmt),
            tool_choice=_echo_tool_choice(req),
            tools=self.tools,
            top_p=req.top_p if req.top_p is not None else 1.0,
            usage=usage,
            user=req.user,
            metadata=dict(req.metadata or {}),
            completed_at=int(time.time()) if status == "completed" else None,
        )

    def finished(self, completion: ChatCompletion) -> Response:
        """The response of a finished chat completion: ``completed``, or ``incomplete`` when cut by
        ``max_output_tokens``."""
        choice = completion.choices[0]
        truncated = choice.finish_reason == "length"
        output = output_of(choice.message, truncated)
        status: ResponseStatus = "incomplete" if truncated else "completed"
        return self.response(
            status,
            output,
            usage_of(completion.usage),
            incomplete="max_output_tokens" if truncated else None,
        )


def _echo_tool_choice(req: ResponsesRequest) -> str | dict[str, object]:
    return req.tool_choice if req.tool_choice is not None else "auto"


def begin_turn(req: ResponsesRequest, model: str, history: list[InputItem], response_id: str) -> Turn:
    """Check ``req`` and build its turn; ``history`` is the earlier turn's input and output items (empty without
    ``previous_response_id``).

    Raises:
        OpenAIError: 400 for an unsupported parameter or a malformed item, tool or format.
    """
    reject_unsupported(req)
    tools = function_tools(req.tools)
    items = history + with_ids(parse_input(req.input))
    chat = chat_request(req, to_messages(items, first=len(history)), tools)
    return Turn(
        id=response_id,
        created_at=int(time.time()),
        model=model,
        request=req,
        tools=tools,
        items=items,
        chat=chat,
    )


def new_response_id() -> str:
    """A fresh response id (``resp_…``)."""
    return item_id("resp")


def output_of(message: ChatCompletionMessage, truncated: bool) -> list[OutputItem]:
    """A chat message as output items: its reasoning, its text, its function calls; the last one is
    ``incomplete`` when ``max_output_tokens`` cut the turn."""
    output: list[OutputItem] = []
    thought = message.reasoning_content
    if isinstance(thought, str) and thought:
        output.append(OutputReasoning(id=item_id("rs"), content=[ReasoningText(text=thought)], status="completed"))
    calls = message.tool_calls if isinstance(message.tool_calls, list) else []
    if message.content or not (output or calls):
        text = OutputText(text=message.content or "")
        output.append(OutputMessage(id=item_id("msg"), status="completed", content=[text]))
    for call in calls:
        output.append(
            OutputFunctionCall(
                id=item_id("fc"),
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
                status="completed",
            )
        )
    if truncated:
        output[-1].status = "incomplete"
    return output


def usage_of(usage: CompletionUsage) -> ResponseUsage:
    """Chat usage in the Responses shape (the whole conversation counts as input)."""
    details = usage.completion_tokens_details
    reasoning = details.reasoning_tokens if isinstance(details, CompletionTokensDetails) else 0
    prompt_details = usage.prompt_tokens_details
    cached = prompt_details.cached_tokens if isinstance(prompt_details, PromptTokensDetails) else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning),
        total_tokens=usage.total_tokens,
    )

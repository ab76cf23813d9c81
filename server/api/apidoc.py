"""OpenAPI metadata the route decorators share (``GET /schema/openapi.json``).

Litestar documents what the handlers' signatures say. This module adds what they cannot: keyed routes take a
bearer token or an ``X-API-Key`` header; every non-2xx body is OpenAI's error envelope, never
Litestar's ``{"status_code", "detail"}``; streaming routes answer ``text/event-stream`` with one JSON object per
``data:`` frame and a final ``data: [DONE]``; every response carries ``x-request-id``. Schemathesis fuzzes the
app against this document (``tests/integration/test_fuzz.py``), so it has to be exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
    SecurityRequirement,
    SecurityScheme,
)
from litestar.plugins.core._msgspec import kwarg_definition_from_field

from schemas.openai.errors import ErrorResponse

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition

SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    "bearer": SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="API key",
        description="`Authorization: Bearer <key>` (what the openai SDK sends).",
    ),
    "apiKey": SecurityScheme(
        type="apiKey",
        name="X-API-Key",
        security_scheme_in="header",
        description="The same key in an `X-API-Key` header.",
    ),
}
KEY_SECURITY: list[SecurityRequirement] = [{"bearer": []}, {"apiKey": []}]
"""Either header authenticates (``/v1`` and ``/admin``)."""

EVENT_STREAM = "text/event-stream"
SSE_STATUS = 299
"""Placeholder status under which a handler's ``responses`` name its stream event type; the operation classes
below move it into the 200 response (Litestar gives one media type per status)."""

_ERRORS = {
    400: "Malformed JSON, wrong types or out-of-range values: `invalid_request_error`, `param` names the field.",
    401: "Missing, unknown, revoked or expired key: `invalid_api_key`.",
    403: "The key's role may not use this model or route: `permission_error`.",
    404: "Unknown model or object: `model_not_found` / `not_found`.",
    413: "The request body is too large.",
    429: "Rate limit (`rate_limit_exceeded`, with `retry-after`), monthly quota (`insufficient_quota`) or too "
    "many failed authentications from this address.",
    500: "Unexpected server error: `server_error`.",
    503: "Model still loading, queue full, shutting down or database unavailable: `server_error`, with `retry-after`.",
}
KEYED = (401, 403, 429, 500, 503)
"""What any keyed route may answer besides its own errors."""
WITH_BODY = (400, 413, *KEYED)
"""What a keyed route with a JSON body may answer."""

_REQUEST_ID = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING),
    required=True,
    description="The request's id (the caller's `x-request-id` when it sent a sane one); also in the logs.",
)


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` for a route: each status documented as ``{"error": {message, type, param, code}}``."""
    return {
        status: ResponseSpec(data_container=ErrorResponse, description=_ERRORS[status], generate_examples=False)
        for status in sorted(set(statuses))
    }


def stream_of(event: type[Any]) -> dict[int, ResponseSpec]:
    """``responses=`` entry naming the type of a streaming route's ``data:`` frames (see :data:`SSE_STATUS`)."""
    return {SSE_STATUS: ResponseSpec(data_container=event, media_type=EVENT_STREAM, generate_examples=False)}


def _schema(response: OpenAPIResponse | Reference, media_type: str) -> Schema | Reference:
    """The schema Litestar generated for ``media_type`` in ``response``."""
    if not isinstance(response, OpenAPIResponse) or not response.content:
        raise TypeError(f"expected a generated response with content, got {response!r}")
    schema = response.content[media_type].schema
    if schema is None:
        raise TypeError(f"no schema for {media_type}")
    return schema


@dataclass
class ApiOperation(Operation):
    """Every documented response carries ``x-request-id``."""

    def __post_init__(self) -> None:
        for response in (self.responses or {}).values():
            if isinstance(response, OpenAPIResponse):
                response.headers = {**(response.headers or {}), "x-request-id": _REQUEST_ID}

    def _event_stream(self) -> OpenAPIMediaType:
        """Pop the placeholder response and describe one SSE event (OpenAPI < 3.2: ``schema`` is per event)."""
        responses = self.responses or {}
        event = _schema(responses.pop(str(SSE_STATUS)), EVENT_STREAM)
        envelope = _schema(responses["400"], "application/json")
        json_frame = Schema(
            type=OpenAPIType.STRING,
            content_media_type="application/json",
            content_schema=Schema(one_of=[event, envelope]),
            description="One JSON object; an error after the first byte is the error envelope, then the stream ends.",
        )
        done = Schema(type=OpenAPIType.STRING, const="[DONE]", description="The last frame of a complete stream.")
        return OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.OBJECT,
                required=["data"],
                properties={"data": Schema(one_of=[done, json_frame])},
                description="One Server-Sent Event: `data: <json>\\n\\n`.",
            )
        )


@dataclass
class JsonOrStreamOperation(ApiOperation):
    """200 is JSON, or ``text/event-stream`` when the request says ``"stream": true``."""

    def __post_init__(self) -> None:
        stream = self._event_stream()
        ok = (self.responses or {})["200"]
        if not isinstance(ok, OpenAPIResponse):
            raise TypeError("expected a generated 200 response")
        ok.content = {**(ok.content or {}), EVENT_STREAM: stream}
        super().__post_init__()


@dataclass
class StreamOperation(ApiOperation):
    """200 is always ``text/event-stream``."""

    def __post_init__(self) -> None:
        stream = self._event_stream()
        ok = (self.responses or {})["200"]
        if not isinstance(ok, OpenAPIResponse):
            raise TypeError("expected a generated 200 response")
        ok.content = {EVENT_STREAM: stream}
        super().__post_init__()


_BOUNDS = {
    "ge": "minimum",
    "gt": "exclusive_minimum",
    "le": "maximum",
    "lt": "exclusive_maximum",
    "min_length": "min_length",
    "max_length": "max_length",
    "min_items": "min_items",
    "max_items": "max_items",
}


class StructBoundsPlugin(StructSchemaPlugin):
    """Litestar's msgspec plugin, plus the bounds it drops.

    Litestar 2.25 copies an optional field's constraints only when they are truthy, so ``Meta(ge=0.0)`` under
    ``| None`` (``top_p``, ``temperature``, ``min_p``, ``repetition_penalty``, ``logprobs``...) lost its
    ``minimum: 0`` and the document accepted values the server rejects. Register it before the built-in one
    (``Litestar(plugins=[...])``).
    """

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        schema: Schema = super().to_openapi_schema(field_definition, schema_creator)
        info = msgspec.inspect.type_info(field_definition.type_)
        if not isinstance(info, msgspec.inspect.StructType):
            return schema
        for field in info.fields:
            prop = (schema.properties or {}).get(field.encode_name)
            kwarg = kwarg_definition_from_field(field)[0]
            if not isinstance(prop, Schema) or kwarg is None:
                continue
            for constraint, attribute in _BOUNDS.items():
                value = getattr(kwarg, constraint, None)
                if value is not None and getattr(prop, attribute) is None:
                    setattr(prop, attribute, value)
        return schema

"""``GET /docs`` and ``GET /openapi.json``: where FastAPI-based servers (vLLM among them) serve their API docs.

They serve the same document as Litestar's ``/schema/openapi.json`` and the same Swagger UI as ``/schema/swagger``,
and are left out of the document itself.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.enums import MediaType
from litestar.openapi.plugins import SwaggerRenderPlugin

_SWAGGER = SwaggerRenderPlugin()


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The OpenAPI document, as ``/schema/openapi.json`` serves it."""
    document = request.app.openapi_schema.to_schema()
    return Response(SwaggerRenderPlugin.render_json(request, document), media_type=MediaType.JSON)


@get("/docs", include_in_schema=False, sync_to_thread=False)
def swagger_ui(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Swagger UI over the OpenAPI document, as ``/schema/swagger`` serves it."""
    return Response(_SWAGGER.render(request, request.app.openapi_schema.to_schema()), media_type=MediaType.HTML)


DOCS_HANDLERS = (openapi_json, swagger_ui)

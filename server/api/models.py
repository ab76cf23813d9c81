"""``/v1/models``: the served models the caller's role may use (others are neither listed nor found)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from schemas.openai.models import Model, ModelList
from server.api.apidoc import KEYED, ApiOperation, errors
from server.api.context import context_of
from server.errors import model_not_found
from server.wiring.models import ServedModels


def _model(models: ServedModels, name: str) -> Model:
    created, owned_by, window = models.describe(name)
    return Model(id=name, created=created, owned_by=owned_by, max_model_len=msgspec.UNSET if window is None else window)


@get("/v1/models", tags=["openai"], sync_to_thread=False, responses=errors(*KEYED), operation_class=ApiOperation)
def list_models(request: Request[Any, Any, Any], models: NamedDependency[ServedModels]) -> ModelList:
    """The served models, local and remote, that the key's role may use."""
    role = context_of(request.scope).caller().role
    return ModelList(data=[_model(models, name) for name in models.order if role.allows_model(name)])


@get(
    "/v1/models/{model_id:path}",
    tags=["openai"],
    sync_to_thread=False,
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
def retrieve_model(
    request: Request[Any, Any, Any], model_id: FromPath[str], models: NamedDependency[ServedModels]
) -> Model:
    """One served model; 404 ``model_not_found`` for a model the key's role may not use, as for an unknown one."""
    name = model_id.lstrip("/")
    if name not in models.order or not context_of(request.scope).caller().role.allows_model(name):
        raise model_not_found(name)
    return _model(models, name)

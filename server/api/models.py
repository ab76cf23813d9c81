"""``/v1/models``."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath

from schemas.openai.models import Model, ModelList
from server.api.apidoc import KEYED, ApiOperation, errors
from server.engine.base import Engine
from server.errors import OpenAIError


def _model(engine: Engine) -> Model:
    info = engine.info
    return Model(id=info.name, created=info.created, owned_by=info.owned_by)


@get("/v1/models", tags=["openai"], sync_to_thread=False, responses=errors(*KEYED), operation_class=ApiOperation)
def list_models(engine: NamedDependency[Engine]) -> ModelList:
    """The served models."""
    return ModelList(data=[_model(engine)])


@get(
    "/v1/models/{model_id:path}",
    tags=["openai"],
    sync_to_thread=False,
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
def retrieve_model(model_id: FromPath[str], engine: NamedDependency[Engine]) -> Model:
    """One served model."""
    model_id = model_id.lstrip("/")
    if model_id != engine.info.name:
        raise OpenAIError(
            404,
            "invalid_request_error",
            f"The model '{model_id}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    return _model(engine)

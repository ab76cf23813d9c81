"""``/v1/models``."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath

from schemas.openai.models import Model, ModelList
from server.api.apidoc import KEYED, ApiOperation, errors
from server.served import ServedModels, model_not_found


def _model(models: ServedModels, name: str) -> Model:
    created, owned_by = models.describe(name)
    return Model(id=name, created=created, owned_by=owned_by)


@get("/v1/models", tags=["openai"], sync_to_thread=False, responses=errors(*KEYED), operation_class=ApiOperation)
def list_models(models: NamedDependency[ServedModels]) -> ModelList:
    """The served models, local and remote."""
    return ModelList(data=[_model(models, name) for name in models.order])


@get(
    "/v1/models/{model_id:path}",
    tags=["openai"],
    sync_to_thread=False,
    responses=errors(*KEYED, 400, 404),
    operation_class=ApiOperation,
)
def retrieve_model(model_id: FromPath[str], models: NamedDependency[ServedModels]) -> Model:
    """One served model."""
    name = model_id.lstrip("/")
    if name not in models.order:
        raise model_not_found(name)
    return _model(models, name)

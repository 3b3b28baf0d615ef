"""/v1/models: what this deployment serves, in OpenAI's list shape with what a request needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from service.deps import StoreDep, _owner
from service.errors import responses
from service.jobs import JobStore
from service.models import CATALOGUE, ModelSpec
from service.problems import NotFound
from service.schemas import ModelList, ModelObject

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(_owner)])


def _model_object(spec: ModelSpec, store: JobStore) -> ModelObject:
    workers = store.workers_online(spec.id)
    return ModelObject(
        id=spec.id,
        created=store.served_since(spec.id),
        owned_by="kandinskylab" if spec.id in CATALOGUE else "k5serve",
        task=spec.task,
        sizes=spec.sizes,
        seconds=list(spec.seconds),
        default_size=spec.default_size,
        default_seconds=spec.default_seconds,
        num_frames=spec.seconds,
        fps=spec.fps,
        default_num_inference_steps=spec.steps,
        max_num_inference_steps=spec.max_steps,
        default_guidance_scale=spec.guidance,
        attention=spec.attention,
        online=workers > 0,
        workers=workers,
        description=spec.description,
    )


@router.get("/models", response_model=ModelList, responses=responses(401, 429, 503))
def list_models(store: StoreDep) -> ModelList:
    """Every model this deployment knows, online ones first."""
    objects = [_model_object(spec, store) for spec in store.known_models()]
    return ModelList(data=sorted(objects, key=lambda m: not m.online))


@router.get("/models/{model_id}", response_model=ModelObject, responses=responses(401, 404, 429, 503))
def retrieve_model(model_id: Annotated[str, Path(description="The model id.")], store: StoreDep) -> ModelObject:
    """One model."""
    for spec in store.known_models():
        if spec.id == model_id:
            return _model_object(spec, store)
    raise NotFound(f"No model '{model_id}'.", param="model", code="model_not_found")

"""/v1/models: what this deployment serves, in OpenAI's list shape with what a request needs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from service.contract.models import CATALOGUE
from service.contract.problems import NotFound
from service.contract.schemas import ModelList, ModelObject
from service.gateway.deps import RosterDep, _owner
from service.gateway.errors import responses
from service.gateway.roster import ModelState

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(_owner)])


def _model_object(state: ModelState) -> ModelObject:
    spec = state.spec
    return ModelObject(
        id=spec.id,
        created=state.since,
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
        online=state.workers > 0,
        workers=state.workers,
        parallel=state.parallel,
        description=spec.description,
    )


# The listing's JSON as of the roster's last read: it changes only when the roster reads Redis again.
_listing: tuple[object, bytes] | None = None


@router.get("/models", response_model=ModelList, responses=responses(401, 429, 503))
def list_models(roster: RosterDep) -> Response:
    """Every model this deployment knows, online ones first (as of the last worker heartbeat)."""
    global _listing
    states = roster.models()
    if _listing is None or _listing[0] is not states:
        objects = [_model_object(state) for state in states]
        _listing = (states, ModelList(data=sorted(objects, key=lambda m: not m.online)).model_dump_json().encode())
    return Response(_listing[1], media_type="application/json")


@router.get("/models/{model_id}", response_model=ModelObject, responses=responses(401, 404, 429, 503))
def retrieve_model(model_id: Annotated[str, Path(description="The model id.")], roster: RosterDep) -> ModelObject:
    """One model."""
    for state in roster.models():
        if state.spec.id == model_id:
            return _model_object(state)
    raise NotFound(f"No model '{model_id}'.", param="model", code="model_not_found")

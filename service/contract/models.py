"""The model catalogue: public model ids -> checkpoint, sizes, durations, steps and guidance.

A `ModelSpec` is what both sides need to know about a model. The gateway validates requests against it and the
worker reads it the same way for every model: from this catalogue for the published checkpoints, or from the
`k5serve.json` file that sits beside a local checkpoint (the tiny test models carry one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from service.contract import magcache

SPEC_FILE = "k5serve.json"

Task = Literal["text-to-video", "image-to-video"]


class ModelSpec(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    task: Task
    # Hub repo id or local directory the worker loads with from_pretrained.
    source: str
    # Allowed output sizes as "WxH" (width first, as in the OpenAI API); the first is the default.
    sizes: list[str] = Field(min_length=1)
    # Allowed durations: seconds (a string, as in the OpenAI API) -> frame count (4k+1; diffusers silently rounds
    # other counts down).
    seconds: dict[str, int] = Field(min_length=1)
    default_seconds: str
    fps: int = 24
    steps: int = Field(ge=1)
    max_steps: int = Field(100, ge=1)
    guidance: float = Field(ge=0)
    # Scheduler shift, for information: the worker uses the checkpoint's own scheduler config.
    shift: float | None = None
    # "nabla" when the checkpoint's transformer uses NABLA sparse attention (needs the flex backend).
    attention: Literal["dense", "nabla"] = "dense"
    # MagCache (step_cache=magcache): upstream's published magnitude ratios, cond/uncond pairs for steps 1..49 of a
    # 50-step run (service/contract/magcache.py; empty: none published), and its accumulated-error threshold.
    mag_ratios: list[float] = []
    mag_threshold: float = Field(magcache.THRESHOLD, gt=0)
    description: str = ""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelSpec:
        # What the pipeline can run (see README, "Models"): the worker would otherwise fail or silently round.
        multiple = 128 if self.attention == "nabla" else 16  # NABLA's block mask needs 128-px sides
        for size in self.sizes:
            w, sep, h = size.partition("x")
            if not (sep and w.isdigit() and h.isdigit()) or int(w) % multiple or int(h) % multiple:
                raise ValueError(f"size {size!r} is not WxH with sides multiples of {multiple}")
        shortest = 17 if self.task == "image-to-video" else 1  # image-to-video below 17 frames returns NaN
        for seconds, frames in self.seconds.items():
            if frames < shortest or (frames - 1) % 4:
                raise ValueError(f"{seconds!r}: {frames} frames is not 4k+1 (at least {shortest})")
        if self.default_seconds not in self.seconds:
            raise ValueError(f"default_seconds {self.default_seconds!r} is not one of {list(self.seconds)}")
        if self.steps > self.max_steps:
            raise ValueError(f"steps {self.steps} exceeds max_steps {self.max_steps}")
        return self

    @property
    def default_size(self) -> str:
        return self.sizes[0]

    def frames_for(self, seconds: str) -> int:
        return self.seconds[seconds]


def parse_size(size: str) -> tuple[int, int]:
    """'768x512' -> (width 768, height 512)."""
    w, _, h = size.partition("x")
    return int(w), int(h)


_SD_SIZES = ["768x512", "512x512", "512x768"]
_HUB = "kandinskylab/Kandinsky-5.0-{}-Diffusers"


def _lite(variant: str, secs: int, steps: int, guidance: float, shift: float) -> ModelSpec:
    frames = {5: 121, 10: 241}[secs]
    return ModelSpec(
        id=f"kandinsky-5.0-t2v-lite-{variant}-{secs}s",
        task="text-to-video",
        source=_HUB.format(f"T2V-Lite-{variant}-{secs}s"),
        sizes=_SD_SIZES,
        seconds={str(secs): frames},
        default_seconds=str(secs),
        steps=steps,
        guidance=guidance,
        shift=shift,
        # Only the 10 s Lite checkpoints ship a NABLA transformer config (P=0.9, wT=11, wH=3, wW=3).
        attention="nabla" if secs == 10 else "dense",
        mag_ratios=magcache.MAG_RATIOS.get(f"kandinsky-5.0-t2v-lite-{variant}-{secs}s", []),
        description=f"Kandinsky 5.0 T2V Lite (2B) {variant}, {secs} s",
    )


def _pro(task: Task) -> ModelSpec:
    short = {"text-to-video": "t2v", "image-to-video": "i2v"}[task]
    return ModelSpec(
        id=f"kandinsky-5.0-{short}-pro-sft-5s",
        task=task,
        source=_HUB.format(f"{short.upper()}-Pro-sft-5s"),
        sizes=_SD_SIZES,
        seconds={"5": 121},
        default_seconds="5",
        steps=50,
        guidance=5.0,
        shift=10.0,
        mag_ratios=magcache.MAG_RATIOS[f"kandinsky-5.0-{short}-pro-sft-5s"],
        description=f"Kandinsky 5.0 {short.upper()} Pro (19B) sft, 5 s",
    )


CATALOGUE: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in [
        *(
            _lite(variant, secs, steps, guidance, shift)
            for secs in (5, 10)
            for variant, steps, guidance, shift in [
                ("sft", 50, 5.0, 10.0),
                ("nocfg", 50, 1.0, 10.0),
                ("distilled16steps", 16, 1.0, 5.0),
                ("pretrain", 50, 5.0, 10.0),
            ]
        ),
        *(_pro(task) for task in ("text-to-video", "image-to-video")),
    ]
}

_TINY_TASKS: list[tuple[str, Task]] = [("t2v", "text-to-video"), ("i2v", "image-to-video")]
# The tiny random-weight checkpoints built by `k5serve tiny-model`: real diffusers classes, CPU seconds.
# Their sizes mirror the published buckets at 1/8 scale; 25 frames is the shortest I2V-safe length (>= 17).
TINY: dict[str, ModelSpec] = {
    spec.id: spec
    for spec in [
        ModelSpec(
            id=f"k5-tiny-{short}",
            task=task,
            source=f"k5-tiny-{short}",
            sizes=["96x64", "64x64", "64x96"],
            seconds={"1": 25, "2": 49},
            default_seconds="1",
            steps=4,
            max_steps=50,
            guidance=5.0,
            shift=10.0,
            description=f"Tiny random-weight Kandinsky 5 {task} model for tests and local development",
        )
        for short, task in _TINY_TASKS
    ]
}


def find_spec(model: str) -> ModelSpec | None:
    """The catalogue entry for a public id or a hub repo id, if any."""
    if model in CATALOGUE:
        return CATALOGUE[model]
    if model in TINY:
        return TINY[model]
    for spec in CATALOGUE.values():
        if spec.source.lower() == model.lower():
            return spec
    return None


def resolve_alias(model: str, aliases: dict[str, str]) -> str:
    """The served model id an operator's alias (K5_MODEL_ALIASES) names, or the id itself."""
    return aliases.get(model, model)


class UnknownModelError(ValueError):
    pass


def resolve_model(model: str, cache_dir: str | None = None) -> ModelSpec:
    """What a worker configured with K5_MODEL serves.

    Accepts a catalogue id, a hub repo id, or a local diffusers directory. A catalogued checkpoint (by id, repo id,
    or a downloaded directory named like its repo) gets its catalogue entry; any other Kandinsky 5 checkpoint is
    read from its own configs (service/contract/checkpoints.py), with an optional k5serve.json beside them.
    """
    from service.contract import checkpoints

    path = Path(model).expanduser()
    if path.is_dir():
        path = path.resolve()
        spec_file = path / SPEC_FILE
        if not (path / "model_index.json").is_file():
            if spec_file.is_file():
                spec = ModelSpec.model_validate(json.loads(spec_file.read_text()))
                return spec.model_copy(update={"source": str(path)})
            for spec in CATALOGUE.values():
                if spec.source.split("/")[-1].lower() == path.name.lower():
                    return spec.model_copy(update={"source": str(path)})
            raise UnknownModelError(
                f"{path} has no model_index.json or {SPEC_FILE} and its name matches no catalogued checkpoint"
            )
        for spec in CATALOGUE.values():
            if spec.source.split("/")[-1].lower() == path.name.lower() and not spec_file.is_file():
                return spec.model_copy(update={"source": str(path)})
        return checkpoints.spec_from_configs(path.name, str(path), checkpoints.local_reader(path))
    found = find_spec(model)
    if found is not None and found.id not in TINY:
        return found
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", model) and model not in TINY:
        return checkpoints.spec_from_configs(model.split("/")[-1], model, checkpoints.hub_reader(model, cache_dir))
    raise UnknownModelError(
        f"unknown model {model!r}: use a catalogue id ({', '.join(sorted(CATALOGUE))}), "
        "a hub repo id of a Kandinsky 5 Diffusers checkpoint, or a local diffusers directory"
    )

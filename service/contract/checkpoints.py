"""A ModelSpec for any Kandinsky 5 Diffusers checkpoint, read from its own configs.

New official checkpoints appear after the catalogue was written, and users fine-tune Lite. A local directory or a
hub repo id laid out like the published "-Diffusers" repos is served by reading:
- model_index.json: the pipeline class, hence the task (Kandinsky5T2VPipeline / Kandinsky5I2VPipeline);
- transformer/config.json: a Kandinsky5Transformer3DModel, and whether it uses NABLA (sizes must then be multiples
  of 128, what its block mask needs);
- scheduler/scheduler_config.json: the shift;
- the name: variant defaults as published (distilled: 16 steps, guidance 1.0; nocfg: guidance 1.0; else 50 steps,
  guidance 5.0) and duration ("10s" in the name: 10 s, else 5 s), at the SD buckets;
- an optional k5serve.json beside them: any ModelSpec fields, which win (e.g. {"steps": 16, "sizes": ["768x512"]}).
The result is validated like every catalogue entry (ModelSpec's own rules). Reads JSON only: no torch here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from service.contract.models import SPEC_FILE, ModelSpec, UnknownModelError

PIPELINE_TASKS = {"Kandinsky5T2VPipeline": "text-to-video", "Kandinsky5I2VPipeline": "image-to-video"}
TRANSFORMER_CLASS = "Kandinsky5Transformer3DModel"
SD_SIZES = ["768x512", "512x512", "512x768"]

# Reads one JSON file of the checkpoint by its relative path; None when the checkpoint has no such file.
Reader = Callable[[str], dict | None]


def _variant(name: str) -> tuple[int, float]:
    """(steps, guidance) of a published variant named in the checkpoint's name."""
    lowered = name.lower()
    if "distill" in lowered:
        return 16, 1.0
    if "nocfg" in lowered:
        return 50, 1.0
    return 50, 5.0


def model_id(name: str) -> str:
    """'Kandinsky-5.0-T2V-Pro-distilled-5s-Diffusers' -> 'kandinsky-5.0-t2v-pro-distilled-5s' (catalogue style)."""
    base = re.sub(r"-diffusers$", "", name.lower())
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._")
    return base[:100] or "kandinsky-5-checkpoint"


def spec_from_configs(name: str, source: str, read: Reader) -> ModelSpec:
    index = read("model_index.json")
    if index is None:
        raise UnknownModelError(f"{source} has no model_index.json: not a Diffusers checkpoint")
    task = PIPELINE_TASKS.get(index.get("_class_name", ""))
    if task is None:
        raise UnknownModelError(
            f"{source} is a {index.get('_class_name')!r} checkpoint; k5serve serves {', '.join(PIPELINE_TASKS)}"
        )
    transformer = read("transformer/config.json") or {}
    if transformer.get("_class_name") != TRANSFORMER_CLASS:
        raise UnknownModelError(f"{source}: transformer/config.json does not describe a {TRANSFORMER_CLASS}")
    scheduler = read("scheduler/scheduler_config.json") or {}
    steps, guidance = _variant(name)
    ten = re.search(r"(^|[^0-9])10s", name.lower()) is not None
    derived = {
        "id": model_id(name),
        "task": task,
        "source": source,
        "sizes": SD_SIZES,
        "seconds": {"10": 241} if ten else {"5": 121},
        "default_seconds": "10" if ten else "5",
        "steps": steps,
        "guidance": guidance,
        "shift": scheduler.get("shift"),
        "attention": "nabla" if transformer.get("attention_type") == "nabla" else "dense",
        "description": f"Kandinsky 5 checkpoint {name} (read from its configs)",
    }
    overrides = read(SPEC_FILE) or {}
    try:
        return ModelSpec.model_validate({**derived, **overrides, "source": source})
    except ValidationError as e:
        raise UnknownModelError(f"{source}: {e}") from e


def local_reader(directory: Path) -> Reader:
    def read(relative: str) -> dict | None:
        path = directory / relative
        return json.loads(path.read_text()) if path.is_file() else None

    return read


def hub_reader(repo_id: str, cache_dir: str | None) -> Reader:
    """Reads from the hub cache first (a warm volume needs no network), then from the hub."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:  # the gateway image has no hub client; workers do (diffusers needs it)
        raise UnknownModelError(f"cannot look up {repo_id!r}: huggingface_hub is not installed") from e

    def read(relative: str) -> dict | None:
        try:
            return json.loads(
                Path(hf_hub_download(repo_id, relative, cache_dir=cache_dir, local_files_only=True)).read_text()
            )
        except EntryNotFoundError:  # not cached (LocalEntryNotFoundError is one)
            pass
        try:
            path = hf_hub_download(repo_id, relative, cache_dir=cache_dir)
        except LocalEntryNotFoundError as e:  # not cached, and the hub is out of reach (or HF_HUB_OFFLINE)
            _missing(relative, f"the hub is out of reach and no copy is cached ({type(e).__name__})")
            return None
        except EntryNotFoundError:
            return None  # the repo has no such file
        except Exception as e:  # unknown repo, gated, no access
            _missing(relative, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None
        return json.loads(Path(path).read_text())

    def _missing(relative: str, why: str) -> None:
        """Without model_index.json there is nothing to serve; a missing optional file reads as absent."""
        if relative == "model_index.json":
            raise UnknownModelError(f"cannot read {repo_id}/model_index.json: {why}")

    return read

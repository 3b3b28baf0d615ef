"""Load a Kandinsky 5 checkpoint one component at a time, each in its own dtype and straight to where it will live.

`Pipeline.from_pretrained` would first bring every component into host memory (Pro: about 61 GB with the fp32-kept
modulation layers) and leave the placing to the caller. Loading component by component with a device map puts the
transformer and VAE straight on the GPU, and only the text encoders that stay in host memory (Pro's "offload"
placement) are ever held there, so the host peak stays near the largest host-resident component instead of the sum.

Also here: the checks of a checkpoint against its catalogue entry (a 10 s checkpoint must never silently run dense).
"""

from __future__ import annotations

import importlib
import json
import logging
import struct
from pathlib import Path

import torch

from service.contract.models import ModelSpec
from service.contract.settings import Settings
from worker.speed import ConfigError

log = logging.getLogger(__name__)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# CLIP runs in fp32 as upstream loads it (kandinsky/models/text_embedders.py); it is 123 M parameters, and its pooled
# embedding is cast to the transformer's dtype by the pipeline.
_FP32_COMPONENTS = ("text_encoder_2",)
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def checkpoint_dir(spec: ModelSpec, settings: Settings) -> Path:
    """The checkpoint's directory: a local one as is, a hub repo from the cache (downloaded if allowed)."""
    if Path(spec.source).is_dir():
        return Path(spec.source)
    from diffusers import DiffusionPipeline

    return Path(DiffusionPipeline.download(spec.source, cache_dir=settings.hf_cache_dir))


def component_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if name in _FP32_COMPONENTS else dtype


def _tensor_sizes(folder: Path) -> dict[str, tuple[int, str]]:
    """name -> (elements, stored dtype) of every tensor in a component folder, read from safetensors headers only."""
    sizes: dict[str, tuple[int, str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                sizes[key] = (n, info["dtype"])
    return sizes


def component_bytes(folder: Path, name: str, dtype: torch.dtype, keep_fp32: list[str] | None = None) -> int:
    """Bytes of one component as loaded in `dtype` (fp32-kept modules at 4 bytes), without loading it."""
    wanted = torch.finfo(component_dtype(name, dtype)).bits // 8
    keep = set(keep_fp32 or [])
    total = 0
    for key, (n, stored) in _tensor_sizes(folder / name).items():
        if not stored.startswith(("F", "BF")):
            total += n * _SAFETENSORS_DTYPE_BYTES.get(stored, 4)  # integer buffers keep their dtype
        else:
            total += n * (4 if keep & set(key.split(".")) else wanted)
    return total


def _class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def weights_bytes(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    """Bytes as loaded of each weighted component of the checkpoint in `folder`."""
    index = json.loads((folder / "model_index.json").read_text())
    out = {}
    for name in ("transformer", "vae", *TEXT_ENCODERS):
        library, cls_name = index[name]
        keep = getattr(_class(library, cls_name), "_keep_in_fp32_modules", None)
        out[name] = component_bytes(folder, name, dtype, list(keep) if keep else None)
    return out


def load_components(
    folder: Path, device: torch.device, dtype: torch.dtype, text_device: torch.device, skip: tuple[str, ...] = ()
) -> dict:
    """Every component of the checkpoint, the weighted ones loaded onto their device in their own dtype.

    `text_device`: where the text encoders are loaded (the compute device, or the host for "offload"/"cpu").
    `skip`: components left out (None), e.g. the text encoders on ranks that receive the embeddings.
    """
    from transformers import AutoTokenizer

    index = json.loads((folder / "model_index.json").read_text())
    components: dict = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library, cls_name = entry
        if name in skip:
            components[name] = None
            continue
        if name.startswith("tokenizer"):
            # The published repos ship a Qwen2VLProcessor as `tokenizer`; building it needs torchvision (its image
            # and video processors) although the pipeline only ever calls it on text. Its text tokenizer lives in
            # the same folder and has the same call interface, so load just that.
            components[name] = AutoTokenizer.from_pretrained(folder / name)
            continue
        cls = _class(library, cls_name)
        if name == "scheduler":
            components[name] = cls.from_pretrained(folder, subfolder=name)
            continue
        target = text_device if name in TEXT_ENCODERS else device
        # A device map loads each tensor from the file straight onto the device: no host copy of the component.
        device_map = {"": target} if target.type != "cpu" else None
        kwargs = {"dtype": component_dtype(name, dtype), "device_map": device_map}
        if library == "diffusers":
            components[name] = cls.from_pretrained(folder, subfolder=name, **kwargs)
        else:
            components[name] = cls.from_pretrained(folder / name, **kwargs)
        components[name].eval()
    return components


def check_checkpoint(pipe, spec: ModelSpec) -> dict:
    """Compare the loaded transformer's attention config and the scheduler's shift with the catalogue entry; log
    what was found, refuse a NABLA entry whose checkpoint is dense, warn on the rest. Returns what was found."""
    config = pipe.transformer.config
    found = {
        "attention_type": getattr(config, "attention_type", None),
        "attention_P": getattr(config, "attention_P", None),
        "attention_windows": [getattr(config, f"attention_w{axis}", None) for axis in "THW"],
        "shift": pipe.scheduler.config.get("shift"),
    }
    nabla = found["attention_type"] == "nabla"
    log.info("checkpoint config", extra={"model": spec.id, "catalogue_attention": spec.attention, **found})
    if spec.attention == "nabla" and not nabla:
        raise ConfigError(
            f"{spec.id} is a NABLA model but the loaded transformer config says attention_type="
            f"{found['attention_type']!r}: it would run dense attention; check K5_MODEL and the downloaded files"
        )
    if nabla:
        p, windows = found["attention_P"], found["attention_windows"]
        if not (isinstance(p, int | float) and 0 < p <= 1) or not all(isinstance(w, int) and w > 0 for w in windows):
            raise ConfigError(
                f"{spec.id}: NABLA config is incomplete or out of range (attention_P={p}, windows wT/wH/wW={windows}); "
                "the checkpoint's transformer/config.json needs attention_P in (0, 1] and positive windows"
            )
        if spec.attention != "nabla":
            log.warning("checkpoint uses NABLA but its catalogue entry says dense", extra={"model": spec.id})
    if spec.shift is not None and found["shift"] is not None and abs(float(found["shift"]) - spec.shift) > 1e-6:
        log.warning(
            "scheduler shift differs from the catalogue; the checkpoint's own is used",
            extra={"model": spec.id, "checkpoint_shift": found["shift"], "catalogue_shift": spec.shift},
        )
    return found

"""`k5serve doctor`: a preflight of a GPU host (or the worker image) before a worker starts on it.

One table, one row per check: ok, warn, FAIL (a blocker: the worker would crash or OOM; the fix is named) or skip
(does not apply here, e.g. no CUDA device on this machine; the reason is named). Exit status 1 when anything
FAILs. Every check runs what it can on a CPU: file and config checks, memory arithmetic against a device size
given with --device-memory, the attention kernel it would pick.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from service.contract.models import ModelSpec, UnknownModelError, parse_size, resolve_model
from service.contract.settings import Settings
from worker import attention, loader, speed

# Share of device memory the budget may fill: the allocator and the CUDA context need the rest.
_BUDGET_SHARE = 0.95
# Bytes per visual token of one block's live activations in bf16 (hidden states in fp32 for the norms, q/k/v and
# attention output, the feed-forward's hidden layer): about 12 model widths + 2 feed-forward widths, 2 bytes each.
_ACTIVATION_WIDTHS = (12, 2)


@dataclass
class Row:
    check: str
    status: str  # ok | warn | FAIL | skip
    detail: str
    fix: str = ""


@dataclass
class Context:
    settings: Settings
    device: torch.device
    device_memory: int | None  # bytes, from the device or --device-memory
    spec: ModelSpec | None = None
    folder: Path | None = None


def _torch(ctx: Context) -> Row:
    cuda = torch.version.cuda or "none"
    if ctx.device.type != "cuda":
        return Row("torch / CUDA / driver", "skip", f"torch {torch.__version__}, CUDA build {cuda}; no CUDA device")
    props = torch.cuda.get_device_properties(ctx.device)
    driver = torch._C._cuda_getDriverVersion() if hasattr(torch._C, "_cuda_getDriverVersion") else "?"
    memory = f"{props.total_memory / 2**30:.0f} GiB"
    return Row(
        "torch / CUDA / driver",
        "ok",
        f"torch {torch.__version__}, CUDA {cuda}, driver API {driver}, {props.name} {memory}",
    )


def _compiler(ctx: Context) -> Row:
    cc = os.environ.get("CC") or next((c for c in ("gcc", "cc", "clang") if shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    missing = [
        what for what, ok in [("a C compiler", cc and shutil.which(cc)), ("Python.h", header.is_file())] if not ok
    ]
    if not missing:
        return Row("C compiler + Python.h (Triton)", "ok", f"{shutil.which(cc)}, {header}")
    status = "FAIL" if ctx.device.type == "cuda" else "warn"
    fix = "install gcc, libc6-dev and python3-dev (docker/worker.Dockerfile does)"
    return Row("C compiler + Python.h (Triton)", status, f"missing {' and '.join(missing)}", fix)


def _triton(ctx: Context) -> Row:
    if ctx.device.type != "cuda":
        return Row("Triton compiles a kernel", "skip", "no CUDA device")
    t0 = time.perf_counter()
    out = torch.compile(lambda x: x * 2 + 1)(torch.ones(64, device=ctx.device))
    torch.cuda.synchronize(ctx.device)
    assert float(out.sum()) == 192.0
    return Row("Triton compiles a kernel", "ok", f"{time.perf_counter() - t0:.1f} s")


def _flex(ctx: Context) -> Row:
    if ctx.device.type != "cuda":
        return Row("compiled flex + block mask (NABLA)", "skip", "no CUDA device")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 512, 512, device=ctx.device)
    q, k, v = (torch.randn(1, 2, 512, 64, device=ctx.device, dtype=torch.bfloat16) for _ in range(3))
    t0 = time.perf_counter()
    torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=mask)
    torch.cuda.synchronize(ctx.device)
    return Row("compiled flex + block mask (NABLA)", "ok", f"{time.perf_counter() - t0:.1f} s")


def _files(ctx: Context) -> Row:
    if not ctx.settings.model:
        return Row("model files", "skip", "K5_MODEL is not set", "set K5_MODEL to the pool's model")
    try:
        ctx.spec = resolve_model(ctx.settings.model)
    except UnknownModelError as e:
        return Row("model files", "FAIL", str(e), "set K5_MODEL to a catalogue id, hub repo id or directory")
    folder = Path(ctx.spec.source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(
                snapshot_download(ctx.spec.source, cache_dir=ctx.settings.hf_cache_dir, local_files_only=True)
            )
        except Exception:
            fix = f"download it first: huggingface-cli download {ctx.spec.source} (or let the worker, online)"
            return Row("model files", "FAIL", f"{ctx.spec.source} is not in the cache", fix)
    missing = []
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        missing.append("model_index.json")
    else:
        for name, entry in json.loads(index_file.read_text()).items():
            if name.startswith("_") or not isinstance(entry, list):
                continue
            sub = folder / name
            if not sub.is_dir():
                missing.append(f"{name}/")
            elif name in ("transformer", "vae", *loader.TEXT_ENCODERS) and not list(sub.glob("*.safetensors")):
                missing.append(f"{name}/*.safetensors")
            elif name in ("transformer", "vae", *loader.TEXT_ENCODERS) and not (sub / "config.json").is_file():
                missing.append(f"{name}/config.json")
    if missing:
        return Row("model files", "FAIL", f"{folder}: missing {', '.join(missing)}", "download the checkpoint again")
    ctx.folder = folder
    return Row("model files", "ok", f"{ctx.spec.id} at {folder}")


def _transformer_config(ctx: Context) -> dict:
    return json.loads((ctx.folder / "transformer" / "config.json").read_text())


def _largest_bucket(ctx: Context, config: dict) -> tuple[int, int, int, int]:
    """(width, height, frames, visual tokens) of the model's largest bucket."""
    _, ph, pw = config.get("patch_size", (1, 2, 2))
    best = None
    for size in ctx.spec.sizes:
        w, h = parse_size(size)
        for n in ctx.spec.seconds.values():
            tokens = ((n - 1) // 4 + 1) * (h // 8 // ph) * (w // 8 // pw)
            if best is None or tokens > best[3]:
                best = (w, h, n, tokens)
    return best


def _memory(ctx: Context) -> Row:
    if ctx.folder is None:
        return Row("memory budget", "skip", "no model files")
    dtype = torch.bfloat16 if ctx.device.type == "cuda" or ctx.device_memory else torch.float32
    weights = loader.weights_bytes(ctx.folder, dtype)
    config = _transformer_config(ctx)
    w, h, n, tokens = _largest_bucket(ctx, config)
    widths = _ACTIVATION_WIDTHS[0] * config["model_dim"] + _ACTIVATION_WIDTHS[1] * config["ff_dim"]
    activations = tokens * widths * 2
    vae = speed.vae_decode_bytes(w, h, n, 2)
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    parts = ", ".join(f"{k} {gb(v)}" for k, v in weights.items())
    if not ctx.device_memory:
        return Row("memory budget", "skip", f"weights GB: {parts}; no device size (give --device-memory GiB)")
    if ctx.settings.text_encoder_placement != "auto":
        placement = ctx.settings.text_encoder_placement
    else:
        placement = "device" if sum(weights.values()) <= speed._RESIDENT_SHARE * ctx.device_memory else "offload"
    resident = weights["transformer"] + weights["vae"]
    text = weights["text_encoder"] + weights["text_encoder_2"]
    if placement == "device":
        resident += text
    # Text phase (offloaded encoders visit the device), denoising, decode: the peak is the largest of the three.
    peak = max(resident + (text if placement == "offload" else 0), resident + activations, resident + vae)
    detail = (
        f"largest bucket {w}x{h}x{n} ({tokens} tokens): weights GB {parts}; text encoders {placement}; "
        f"activations {gb(activations)}, VAE decode {gb(vae)}; peak {gb(peak)} of {gb(ctx.device_memory)} GB"
    )
    if peak > _BUDGET_SHARE * ctx.device_memory:
        return Row("memory budget", "FAIL", detail, "a larger GPU, K5_TEXT_ENCODER_PLACEMENT=cpu, or fewer buckets")
    return Row("memory budget", "ok", detail)


def _attention(ctx: Context) -> Row:
    if ctx.folder is None:
        return Row("attention kernel", "skip", "no model files")
    config = _transformer_config(ctx)
    nabla = config.get("attention_type") == "nabla"
    head_dim = sum(config["axes_dims"])
    heads = config["model_dim"] // head_dim
    tokens = _largest_bucket(ctx, config)[3]
    if ctx.device.type != "cuda":
        visual = "flex" if nabla else "native"
        return Row("attention kernel", "skip", f"no CUDA device to time kernels; would run native (visual: {visual})")
    names = (
        attention.candidates(ctx.device)
        if ctx.settings.attention_backend == "auto"
        else [ctx.settings.attention_backend]
    )
    timings, rejected = attention.validate(
        names, heads, head_dim, tokens, ctx.device, torch.bfloat16, True, skip_visual=nabla
    )
    if not timings:
        return Row("attention kernel", "FAIL", f"no kernel passes: {rejected}", "set K5_ATTENTION_BACKEND=native")
    best = min(timings, key=timings.get)
    visual = "flex" if nabla else best
    status = "warn" if rejected and ctx.settings.attention_backend != "auto" else "ok"
    detail = f"{best} (visual self-attention: {visual}); " + ", ".join(
        f"{k} {v * 1e3:.1f} ms" for k, v in timings.items()
    )
    if rejected:
        detail += f"; rejected: {', '.join(rejected)}"
    return Row("attention kernel", status, detail)


def _config(ctx: Context) -> Row:
    if ctx.folder is None:
        return Row("worker settings", "skip", "no model files")
    nabla = _transformer_config(ctx).get("attention_type") == "nabla"
    scope = speed.compile_scope(ctx.settings, ctx.device)
    if ctx.spec.attention == "nabla" and not nabla:
        return Row("worker settings", "FAIL", "the catalogue says NABLA, the checkpoint config is dense", "re-download")
    if nabla and ctx.device.type == "cuda" and scope == "off":
        return Row("worker settings", "FAIL", "NABLA with compile off runs flex uncompiled (OOM)",
                   "set K5_COMPILE_TRANSFORMER=auto")  # fmt: skip
    return Row("worker settings", "ok", f"compile {scope}, step cache {ctx.settings.step_cache}, NABLA {nabla}")


CHECKS: list[Callable[[Context], Row]] = [_torch, _compiler, _triton, _flex, _files, _memory, _attention, _config]


def run(settings: Settings, device_memory_gib: float | None = None) -> list[Row]:
    cuda = torch.cuda.is_available() and (settings.device == "auto" or settings.device.startswith("cuda"))
    device = torch.device("cuda" if cuda else "cpu")
    memory = torch.cuda.get_device_properties(device).total_memory if cuda else None
    if device_memory_gib:
        memory = int(device_memory_gib * 2**30)
    ctx = Context(settings, device, memory)
    rows = []
    for check in CHECKS:
        try:
            rows.append(check(ctx))
        except Exception as e:  # a check that crashes is a finding, not the end of the report
            name = check.__name__.strip("_")
            rows.append(Row(name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "see the error"))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| check | status | detail | fix |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.detail} | {r.fix} |" for r in rows]
    return "\n".join(lines)

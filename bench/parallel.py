"""Projected speed-up of one video on several GPUs (K5_PARALLEL), from the bytes each layout moves per step and the
FLOP model of bench/flops.py, at 768x512x121 for Lite (2B) and Pro (19B).

    python -m bench.parallel                 # the projection table
    python -m bench.parallel --measure       # also count the bytes the real code moves (tiny model, gloo, CPU)

Bytes per step and rank, bf16 (what worker/parallel.py and diffusers' context-parallel hooks send):
- cfg=2: one all-gather of the transformer output (latent frames x H/8 x W/8 x 16 channels): each rank sends its half.
- sp=P (Ulysses): per visual block, q, k, v and the attention output go through an all-to-all, each rank sending
  (P-1)/P of its N/P x d tokens; after the last block one all-gather of the N x d tokens. A guided step runs two
  forwards (one per cfg rank with cfg=2).
`--measure` counts the same collectives in the real code on the tiny model and prints them next to these formulas.

Time per step = forwards per rank x FLOPs / (ranks in sp) / achieved FLOP/s + bytes / link bandwidth, with no overlap
of communication and compute (Ulysses' all-to-alls sit on the critical path). Assumptions, flags to change them:
H100 SXM at 400 TFLOP/s achieved in bf16 (about 40% of its 989 dense), NVLink 4 at 450 GB/s per direction per GPU,
of which an all-to-all or all-gather reaches 70%. Text encoding and the VAE decode are not split (rank 0) and are
left out: the table is the denoising loop's speed-up. No machine with several GPUs was measured.
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

from bench.configs import TRANSFORMERS
from bench.flops import transformer_flops

BF16 = 2
LATENT_CHANNELS = 16
LAYOUTS = [(1, 1), (2, 1), (1, 2), (1, 4), (1, 8), (2, 2), (2, 4)]


def config_of(model: str) -> dict:
    return {
        **TRANSFORMERS[model],
        "patch_size": (1, 2, 2),
        "in_visual_dim": 16,
        "out_visual_dim": 16,
        "in_text_dim": 3584,
    }


def step_bytes(config: dict, tokens: int, latent_elements: int, cfg: int, sp: int, guided: bool) -> int:
    """Bytes one rank sends per denoising step."""
    d, blocks = config["model_dim"], config["num_visual_blocks"]
    forwards = (2 if guided else 1) // cfg if cfg > 1 else (2 if guided else 1)
    total = 0
    if sp > 1:
        local = tokens // sp * d
        per_forward = blocks * 4 * local * (sp - 1) // sp + local  # all-to-alls, then the final all-gather
        total += forwards * per_forward * BF16
    if cfg > 1 and guided:
        total += latent_elements * BF16  # this rank's half of the guidance pair
    return total


def project(model: str, width: int, height: int, frames: int, text: int, tflops: float, link_gbs: float):
    config = config_of(model)
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    tokens = t * (h // 2) * (w // 2)
    latent = t * h * w * LATENT_CHANNELS
    heads = config["model_dim"] // sum(config["axes_dims"])
    flops = transformer_flops(config, tokens, text)["total"]
    rows = []
    base = None
    for cfg, sp in LAYOUTS:
        forwards = 1 if cfg == 2 else 2  # a guided step: cond + uncond
        compute = forwards * flops / sp / (tflops * 1e12)
        sent = step_bytes(config, tokens, latent, cfg, sp, guided=True)
        comm = sent / (link_gbs * 1e9)
        step = compute + comm
        base = base or step
        note = "" if heads % sp == 0 else f"{heads} heads: needs ring=2 (or pads heads)"
        rows.append((model, f"cfg={cfg},sp={sp}", cfg * sp, sent / 2**20, compute, comm, step, base / step, note))
    return rows


def _counting_rank(rank: int, model: str, layout: str, init_method: str, out: str) -> None:
    """One rank of a tiny gloo group that counts the bytes it sends through each collective."""
    import json

    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from service.contract.models import resolve_model
    from service.contract.record import GenerationRequest
    from service.contract.settings import Settings
    from worker import parallel
    from worker.pipeline import VideoPipeline

    torch.set_num_threads(1)
    sent = {"bytes": 0, "steps": 0}

    def counted(fn, share):
        def wrapper(tensor, *args, **kwargs):
            group = kwargs.get("group", args[-1] if args else None)
            size = dist.get_world_size(group) if group is not None else dist.get_world_size()
            sent["bytes"] += int(tensor.numel() * tensor.element_size() * share(size))
            return fn(tensor, *args, **kwargs)

        return wrapper

    funcol.all_to_all_single = counted(funcol.all_to_all_single, lambda p: (p - 1) / p)
    funcol.all_gather_tensor = counted(funcol.all_gather_tensor, lambda p: 1)
    original_gather = dist.all_gather
    dist.all_gather = lambda chunks, tensor, group=None: (  # type: ignore[assignment]
        sent.__setitem__("bytes", sent["bytes"] + tensor.numel() * tensor.element_size()),
        original_gather(chunks, tensor, group=group),
    )[1]
    settings = Settings(model=model, parallel=layout, log_level="WARNING", dtype="bfloat16")
    group = parallel.init(rank, settings.layout, init_method, torch.device("cpu"))
    video = VideoPipeline.load(settings, resolve_model(model), group)
    req = GenerationRequest(
        prompt="a fox", width=96, height=64, num_frames=25, num_inference_steps=2, guidance_scale=5.0, seed=0
    )

    def step(done: int, total: int) -> None:
        sent["steps"] = done

    if rank == 0:
        sent["bytes"] = 0
        parallel.Leader(video, group).generate(req, step)
        Path(out).write_text(json.dumps(sent))
        group.send("exit")
    else:
        parallel.follow(video, group)


def measure(model_dir: str, layout: str) -> tuple[float, float]:
    """(bytes rank 0 sent per step, the formula's) for the tiny model at 96x64x25, bf16."""
    import json
    import tempfile

    from service.console.localstack import free_port
    from service.contract.parallel import parse
    from worker.tiny import _transformer

    lay = parse(layout)
    out = Path(tempfile.mkdtemp()) / "sent.json"
    ctx = multiprocessing.get_context("spawn")
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_counting_rank, args=(r, model_dir, layout, init, str(out))) for r in range(lay.world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    counted = json.loads(out.read_text())
    tiny = _transformer().config
    config = {"model_dim": tiny.model_dim, "num_visual_blocks": tiny.num_visual_blocks}
    tokens, latent = 7 * 4 * 6, 7 * 8 * 12 * LATENT_CHANNELS
    return counted["bytes"] / counted["steps"], step_bytes(config, tokens, latent, lay.cfg, lay.sp, guided=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU")
    parser.add_argument("--link-gbs", type=float, default=450 * 0.7, help="effective collective GB/s per GPU")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--measure", metavar="TINY_T2V_DIR", help="count the bytes on the tiny model (gloo, CPU)")
    args = parser.parse_args()
    print(f"768x512x121, guided (50-step sft), {args.tflops:.0f} TFLOP/s, {args.link_gbs:.0f} GB/s per GPU")
    print("| model | layout | GPUs | MiB sent/step/rank | compute s/step | comm s/step | s/step | speed-up | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in ("lite", "pro"):
        for row in project(model, 768, 512, 121, args.text_tokens, args.tflops, args.link_gbs):
            m, layout, gpus, mib, compute, comm, step, speedup, note = row
            print(f"| {m} | {layout} | {gpus} | {mib:.0f} | {compute:.3f} | {comm:.3f} | {step:.3f} | "
                  f"{speedup:.2f}x | {note} |")  # fmt: skip
    if args.measure:
        print("\n| tiny layout | counted B/step (rank 0) | formula B/step |\n|---|---|---|")
        for layout in ("cfg=2", "sp=2", "cfg=2,sp=2"):
            counted, formula = measure(args.measure, layout)
            print(f"| {layout} | {counted:.0f} | {formula:.0f} |")


if __name__ == "__main__":
    main()

"""What resumable jobs cost and save: the time from SIGTERM to the checkpoint stored, and the checkpoint's size.

    python bench/checkpoint.py [--steps 20] [--stops 5] [--json out.json]

Part 1 runs the tiny model (CPU, 96x64, 25 frames) through the worker's own path (VideoPipeline.generate with the
runner's state callback and worker/checkpoint.py's Checkpoints on file storage) and sets the shutdown flag, as
the worker's SIGTERM handler does with K5_SHUTDOWN_GRACE_S=0, at a random moment inside a step: the job stores
the state of that step when it ends. Side by side, the baseline without checkpoints: the steps a requeued job runs
again. Part 2 serialises the state of the published checkpoints' real shapes (zeros: the size does not depend on
the values) for 768x512 at 121 and 241 frames: VAE compression 4x in time and 8x in space (diffusers'
AutoencoderKLHunyuanVideo, vae_scale_factor_temporal/spatial), 16 latent channels plus 16 visual-conditioning
channels and a mask (upstream configs/k5_*: in_visual_dim 16, visual_cond true), bf16, prompt embeddings of up to
512 Qwen tokens x 3584 and a 768-d CLIP vector.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sigterm_to_stored(steps: int, stops: int) -> list[dict]:
    import torch

    from service.contract.models import resolve_model
    from service.contract.record import GenerationRequest
    from service.contract.settings import Settings
    from service.contract.storage import LocalStorage
    from worker.checkpoint import Checkpoints, checkpoint_key, fingerprint
    from worker.pipeline import VideoPipeline
    from worker.tiny import save_tiny_models

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="k5-bench-ckpt-") as tmp:
        models = save_tiny_models(Path(tmp) / "tiny")
        pipeline = VideoPipeline.load(Settings(), resolve_model(str(models["t2v"])))
        pipeline.warm()
        storage = LocalStorage(Path(tmp) / "store")
        ckpts = Checkpoints(storage, pipeline.spec.id, every_steps=0, on_shutdown=True, ttl_s=3600)
        req = GenerationRequest(
            prompt="a lighthouse in a storm", width=96, height=64, num_frames=25, num_inference_steps=steps,
            guidance_scale=5.0, seed=3,
        )  # fmt: skip
        fp = fingerprint(pipeline, req)
        step_s = _step_seconds(pipeline, req)
        rnd = random.Random(0)
        for n in range(stops):
            stop, stored, sent = threading.Event(), [], []
            at = rnd.uniform(0.3, 0.7) * steps * step_s  # somewhere inside a step in the middle of the run

            latest: list = []

            # As worker/runner.py does: the state callback keeps each step's state, and the step callback that
            # follows it stores it and stops once the flag is set.
            def on_state(state, latest=latest) -> None:
                latest[:] = [state]

            def on_step(done: int, total: int, stop=stop, stored=stored, latest=latest, n=n) -> None:
                if stop.is_set():
                    if latest and ckpts.due(done, total, stopping=True):
                        size = ckpts.save(f"video_{n}", latest[0], fp)
                        stored.append((time.perf_counter(), done, size))
                    raise InterruptedError

            def sigterm(stop=stop, sent=sent) -> None:
                sent.append(time.perf_counter())
                stop.set()

            timer = threading.Timer(at, sigterm)
            timer.start()
            try:
                pipeline.generate(req, on_step, on_state=on_state)
            except InterruptedError:
                pass
            timer.cancel()
            if not stored or not sent:
                continue  # the run ended before the flag was set
            t_stored, step, size = stored[0]
            assert storage.exists(checkpoint_key(f"video_{n}"))
            rows.append(
                {
                    "stopped_at_step": step,
                    "sigterm_to_stored_s": t_stored - sent[0],
                    "step_s": step_s,
                    "checkpoint_bytes": size,
                    "baseline_steps_rerun": step,  # without checkpoints the requeued job runs them again
                    "ours_steps_rerun": 0,
                }
            )
    return rows


def _step_seconds(pipeline, req) -> float:
    pipeline.generate(req)
    stats = pipeline.last_stats
    assert stats is not None and stats.step_s is not None
    return stats.step_s


def real_shape_sizes() -> list[dict]:
    import torch

    from worker.checkpoint import DenoiseState, serialise
    from worker.textcache import PromptEmbeds

    def embeds(tokens: int) -> PromptEmbeds:
        return PromptEmbeds(
            torch.zeros(1, tokens, 3584, dtype=torch.bfloat16),
            torch.zeros(1, 768, dtype=torch.bfloat16),
            torch.tensor([0, tokens], dtype=torch.int32),
        )

    rows = []
    for frames in (121, 241):
        latent_frames = (frames - 1) // 4 + 1
        latents = torch.zeros(1, latent_frames, 512 // 8, 768 // 8, 16 + 16 + 1, dtype=torch.bfloat16)
        # The longest prompt (512 tokens) and diffusers' default negative prompt (about 40 tokens).
        state = DenoiseState(25, 50, latents, torch.Generator(), embeds(512), embeds(40), None)
        t0 = time.perf_counter()
        data = serialise(state, "0" * 64)
        rows.append(
            {
                "shape": f"768x512x{frames}",
                "latents_shape": list(latents.shape),
                "latents_mb": latents.numel() * 2 / 1e6,
                "checkpoint_mb": len(data) / 1e6,
                "serialise_s": time.perf_counter() - t0,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    stops = sigterm_to_stored(args.steps, args.stops)
    sizes = real_shape_sizes()
    print(f"SIGTERM -> checkpoint stored, tiny t2v 96x64x25, {args.steps} steps, file storage")
    print("| stopped at step | SIGTERM->stored s | s/step | checkpoint KB | steps rerun: baseline | ours |")
    print("|---|---|---|---|---|---|")
    for row in stops:
        print(
            f"| {row['stopped_at_step']} | {row['sigterm_to_stored_s']:.3f} | {row['step_s']:.3f} "
            f"| {row['checkpoint_bytes'] / 1e3:.0f} | {row['baseline_steps_rerun']} | {row['ours_steps_rerun']} |"
        )
    if stops:
        worst = max(r["sigterm_to_stored_s"] for r in stops)
        median = statistics.median(r["sigterm_to_stored_s"] for r in stops)
        print(f"median {median:.3f} s, max {worst:.3f} s = {worst / stops[0]['step_s']:.2f} steps")
    print("\nCheckpoint size at the published shapes (bf16)")
    print("| shape | latents (B,T,H,W,C) | latents MB | checkpoint MB | serialise s |")
    print("|---|---|---|---|---|")
    for row in sizes:
        print(
            f"| {row['shape']} | {tuple(row['latents_shape'])} | {row['latents_mb']:.1f} | {row['checkpoint_mb']:.1f} "
            f"| {row['serialise_s']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"sigterm": stops, "sizes": sizes}, indent=2))


if __name__ == "__main__":
    main()

"""The GPU never waits for the CPU: throughput with encode and upload in line vs in the background, and what one
video's encode and upload cost at the published sizes.

    python bench/overlap.py                       # both parts, CPU, about 10 minutes on an idle 2-core machine
    python bench/overlap.py --jobs 10 --size 96x64 --skip-encode-sizes
    python bench/overlap.py --encode-only --frames 121,241

Part 1 runs `--jobs` back-to-back jobs through the real worker loop (RQ SimpleWorker, JobRun, the tiny model, a
real Redis and SeaweedFS S3 started here), twice in one process: `serial` (K5_POSTPROCESS_JOBS=0, encode and
upload in line, as before) and `overlapped` (K5_POSTPROCESS_JOBS=1). Jobs/minute comes from the first job's start
to the last completion. On a CPU the pipeline and the encoder share the cores; `--torch-threads` (1 by default)
keeps the pipeline, the GPU's stand-in, on one of them, as on a GPU machine, where it computes on the device
while the encoder uses host cores.

Part 2 times the real encoder (worker/encode.py: H.264 preset medium, the WebP thumbnail, the JPEG spritesheet)
and the upload to S3 of one video at 768x512 with 121 and 241 frames, on synthetic frames (a moving textured
gradient: x264's cost depends on the content, pure noise would cost several times more), as a share of the
published GPU times of a whole job: distilled 5 s 35 s, sft 5 s 139 s (and the 10 s variants at 241 frames).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import report  # noqa: E402

BUCKET = "k5bench"
# Published seconds of one whole job on one GPU (the models' cards, H100): the share's denominators.
# At 241 frames the 10 s variants take longer on the GPU, so the same denominators overstate that row's share.
GPU_SECONDS = {"distilled 5 s": 35.0, "sft 5 s": 139.0}

THROUGHPUT_COLUMNS = [
    ("mode", "mode", "{}"),
    ("jobs", "jobs", "{}"),
    ("size", "size", "{}"),
    ("frames", "frames", "{}"),
    ("steps", "steps", "{}"),
    ("wall s / round", "wall_s", "{:.2f}"),
    ("jobs/min", "jobs_per_min", "{:.2f}"),
    ("generate s/job", "generate_s", "{:.2f}"),
    ("encode s/job", "encode_s", "{:.3f}"),
    ("upload s/job", "upload_s", "{:.3f}"),
    ("vs serial", "vs_serial", "{:.3f}"),
]
ENCODE_COLUMNS = [
    ("size", "size", "{}"),
    ("frames", "frames", "{}"),
    ("to uint8 s (CPU, old)", "convert_s", "{:.2f}"),
    ("mp4 s", "mp4_s", "{:.2f}"),
    ("thumb+sheet s", "stills_s", "{:.2f}"),
    ("upload s", "upload_s", "{:.2f}"),
    ("MB", "mb", "{:.1f}"),
    ("% of distilled 35 s", "pct_distilled", "{:.1f}"),
    ("% of sft 139 s", "pct_sft", "{:.1f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10)
    p.add_argument("--size", default="96x64", help="part 1: frame size of every job (the tiny model runs any)")
    p.add_argument("--seconds", default="1", help="part 1: the tiny model's duration (1: 25 frames, 2: 49)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1, help="part 1: intra-op threads of the pipeline")
    p.add_argument(
        "--rounds", type=int, default=2, help="part 1: rounds of each mode, in ABBA order against load drift"
    )
    p.add_argument("--frames", default="121,241", help="part 2: frame counts at 768x512")
    p.add_argument("--encode-only", action="store_true")
    p.add_argument("--skip-encode-sizes", action="store_true")
    return p.parse_args(argv)


def moving_frames(n: int, width: int = 768, height: int = 512, seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, 3): a gradient that drifts each frame, with a fixed fine texture on top."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.random.default_rng(seed).integers(0, 24, (height, width, 1), dtype=np.uint8)
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for t in range(n):
        phase = t * 0.05
        for c in range(3):
            wave = 0.5 + 0.5 * np.sin(x / (60 + 20 * c) + y / 90 + phase * (c + 1))
            out[t, :, :, c] = (wave * 220).astype(np.uint8)
        out[t] += texture
    return out


def encode_row(storage, frames: np.ndarray, tmp: Path) -> dict:
    from service.contract.jobs import VARIANTS
    from worker import encode

    n, h, w, _ = frames.shape
    # The CPU conversion the worker did before converting on the device (float32 in, as diffusers' "np" output).
    as_float = frames.astype(np.float32) / 255.0
    t = time.perf_counter()
    if np.isfinite(as_float).all():
        (np.clip(as_float, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    convert_s = time.perf_counter() - t
    del as_float
    paths = {v: tmp / VARIANTS[v][0] for v in ("video", "thumbnail", "spritesheet")}
    t = time.perf_counter()
    encode.write_mp4(frames, paths["video"])
    mp4_s = time.perf_counter() - t
    t = time.perf_counter()
    encode.write_thumbnail(frames, paths["thumbnail"])
    encode.write_spritesheet(frames, paths["spritesheet"])
    stills_s = time.perf_counter() - t
    t = time.perf_counter()
    for variant in ("thumbnail", "spritesheet", "video"):
        storage.put_file(f"bench/{n}/{VARIANTS[variant][0]}", paths[variant], VARIANTS[variant][1])
    upload_s = time.perf_counter() - t
    post = mp4_s + stills_s + upload_s
    shares = GPU_SECONDS
    return {
        "size": f"{w}x{h}",
        "frames": n,
        "convert_s": convert_s,
        "mp4_s": mp4_s,
        "stills_s": stills_s,
        "upload_s": upload_s,
        "mb": sum(p.stat().st_size for p in paths.values()) / 1e6,
        "pct_distilled": 100 * post / shares["distilled 5 s"],
        "pct_sft": 100 * post / shares["sft 5 s"],
    }


def throughput_rows(args, settings, tiny_dir: Path) -> list[dict]:
    import redis
    import torch
    from rq import Queue, SimpleWorker

    from service.contract import metrics
    from service.contract.jobs import JobStore, plan_job
    from service.contract.lifecycle import Lifecycle
    from service.contract.models import resolve_model
    from service.contract.schemas import VideoCreate
    from service.contract.storage import open_storage
    from worker import runner
    from worker.main import Heartbeat
    from worker.pipeline import VideoPipeline
    from worker.post import PostProcessor

    torch.set_num_threads(args.torch_threads)
    spec = resolve_model(str(tiny_dir))
    # The tiny model serves any size here: the bench widens its buckets to the one it times.
    spec = spec.model_copy(update={"sizes": [args.size]})
    pipeline = VideoPipeline.load(settings, spec)
    pipeline.warm()
    r = redis.Redis.from_url(settings.redis_url)
    store, storage = JobStore(r, settings), open_storage(settings)
    order = ["serial", "overlapped", "overlapped", "serial"] * (args.rounds // 2) + ["serial", "overlapped"] * (
        args.rounds % 2
    )
    totals = {mode: {"wall": 0.0, "jobs": 0, "generate": 0.0, "encode": 0.0, "upload": 0.0} for mode in order}
    for n, mode in enumerate(order):
        post = PostProcessor(1) if mode == "overlapped" else None
        ctx = runner.WorkerContext(store, storage, pipeline, f"bench-{mode}-{n}", 3600, post=post)
        runner.configure(ctx)
        beat = Heartbeat(store, spec, ctx.worker_name, settings.heartbeat_s, ctx, storage)
        beat.start()
        ids = []
        for i in range(args.jobs):
            req = VideoCreate(
                prompt=f"a lighthouse {i}", num_inference_steps=args.steps, seconds=args.seconds, size=args.size
            )
            rec = plan_job(req, spec, has_image=False)
            Lifecycle(store).create(rec)
            ids.append(rec.id)
        before = {p: _phase_sum(metrics, spec.id, p) for p in ("denoise", "decode", "encode", "upload")}
        t0 = time.perf_counter()
        SimpleWorker([Queue(spec.id, connection=r)], connection=r).work(burst=True, logging_level="WARNING")
        if post is not None:
            post.close()
        wall = time.perf_counter() - t0
        beat.stopped.set()
        statuses = {store.get(v).status for v in ids}
        if statuses != {"completed"}:
            raise SystemExit(f"{mode}: jobs ended {statuses}")
        spent = {p: _phase_sum(metrics, spec.id, p) - before[p] for p in before}
        total = totals[mode]
        total["wall"] += wall
        total["jobs"] += args.jobs
        total["generate"] += spent["denoise"] + spent["decode"]
        total["encode"] += spent["encode"]
        total["upload"] += spent["upload"]
        print(f"round {n + 1}/{len(order)} {mode}: {wall:.2f} s for {args.jobs} jobs", flush=True)
    rows = []
    for mode, total in totals.items():
        jobs = total["jobs"]
        rows.append(
            {
                "mode": mode,
                "jobs": f"{args.jobs} x {jobs // args.jobs}",
                "size": args.size,
                "frames": spec.seconds[args.seconds],
                "steps": args.steps,
                "wall_s": total["wall"] / (jobs // args.jobs),
                "jobs_per_min": 60 * jobs / total["wall"],
                "generate_s": total["generate"] / jobs,
                "encode_s": total["encode"] / jobs,
                "upload_s": total["upload"] / jobs,
            }
        )
    for row in rows:
        row["vs_serial"] = row["jobs_per_min"] / rows[0]["jobs_per_min"]
    return rows


def _phase_sum(metrics, model: str, phase: str) -> float:
    """Seconds the worker observed in `phase` so far (its phase histogram's sum)."""
    for metric in metrics.PHASE_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum") and sample.labels == {"model": model, "phase": phase}:
                return sample.value
    return 0.0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from service.console.localstack import RedisServer, SeaweedS3
    from service.contract.settings import Settings
    from service.contract.storage import S3Storage, open_storage

    with tempfile.TemporaryDirectory(prefix="k5-overlap-") as tmp:
        work = Path(tmp)
        redis_server = RedisServer(work / "redis").start()
        s3 = SeaweedS3(work / "s3").start()
        os.environ.update(s3.env)
        try:
            settings = Settings(redis_url=redis_server.url, storage_url=f"s3://{BUCKET}/v", s3_endpoint_url=s3.endpoint)
            S3Storage(BUCKET, "", settings).ensure_bucket()
            load = os.getloadavg()[0]
            print(f"load average at start: {load:.2f} on {os.cpu_count()} CPUs", flush=True)
            if not args.encode_only:
                from worker.tiny import save_tiny_models

                tiny = save_tiny_models(work / "tiny")["t2v"]
                rows = throughput_rows(args, settings, tiny)
                print(report.table(rows, THROUGHPUT_COLUMNS), flush=True)
            if not args.skip_encode_sizes:
                storage = open_storage(settings)
                rows = [encode_row(storage, moving_frames(int(n)), work) for n in args.frames.split(",") if n.strip()]
                print(report.table(rows, ENCODE_COLUMNS), flush=True)
            print(f"load average at end: {os.getloadavg()[0]:.2f}", flush=True)
        finally:
            s3.stop()
            redis_server.stop()


if __name__ == "__main__":
    main()

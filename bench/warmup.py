"""Worker start-up: load, warm-up over every bucket (compiling), then two jobs, each run in a fresh process.

    python bench/warmup.py --tiny --set compile_transformer=regional --set compile_mode=default   # CPU, minutes
    python bench/warmup.py --full --model lite --runs 2 --json warmup.json                        # GPU

A restarted worker is a new process: the first run starts with an empty compile cache (K5_COMPILE_CACHE_DIR), the
later ones find what the first left there, as a worker does with the cache on a persistent volume. The two jobs
after the warm-up show whether the first job still pays for anything (compiling, autotuning, lazy set-up).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report  # noqa: E402

COLUMNS = [
    ("run", "run", "{}"),
    ("compile cache", "cache", "{}"),
    ("compile", "compile", "{}"),
    ("buckets", "buckets", "{}"),
    ("load s", "load_s", "{:.2f}"),
    ("warm-up s", "warm_s", "{:.2f}"),
    ("first job s", "first_job_s", "{:.3f}"),
    ("second job s", "second_job_s", "{:.3f}"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="the tiny checkpoint, loaded as the worker loads it")
    mode.add_argument("--full", action="store_true", help="full-size random-weight architecture (GPU)")
    p.add_argument("--model", choices=["lite", "pro"], default="lite", help="--full: which architecture")
    p.add_argument("--frames", type=int, default=121, help="--full: the one bucket's frame count")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of each timed job")
    p.add_argument("--runs", type=int, default=2, help="fresh processes, sharing one compile cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="k5serve worker setting")
    p.add_argument("--json", type=Path, help="save the rows here")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # one run: write its row to this file
    return p.parse_args(argv)


def build(args: argparse.Namespace, settings):
    """The worker's VideoPipeline and one request of its largest bucket."""
    from service.contract.models import ModelSpec, resolve_model
    from worker.pipeline import GenerationRequest, VideoPipeline, buckets, pick_device, pick_dtype

    if args.tiny:
        from worker.tiny import save_tiny_models

        models = save_tiny_models(Path(tempfile.mkdtemp(prefix="k5-warmup-")))
        spec = resolve_model(str(models["t2v"]))
        pipeline = VideoPipeline.load(settings, spec)
    else:
        from bench.configs import Case, build_pipeline

        device, case = pick_device(settings), Case(args.model, 768, 512, args.frames, False, "sft")
        pipe = build_pipeline(case, device, pick_dtype(settings, device))
        pipe.set_progress_bar_config(disable=True)
        spec = ModelSpec(
            id=f"bench-{args.model}",
            task="text-to-video",
            source="bench (random weights)",
            sizes=["768x512"],
            seconds={"bench": args.frames},
            default_seconds="bench",
            steps=args.steps,
            max_steps=1000,
            guidance=5.0,
        )
        pipeline = VideoPipeline(pipe, spec, device, settings)
    width, height, frames = max(buckets(spec), key=lambda b: b[0] * b[1] * b[2])
    request = GenerationRequest("a red fox in the snow", width, height, frames, args.steps, spec.guidance, seed=0)
    return pipeline, request, len(buckets(spec))


def child(args: argparse.Namespace) -> None:
    import torch

    from service.contract.settings import Settings

    settings = Settings(enhance_prompt="off", **dict(kv.split("=", 1) for kv in args.set))
    t0 = time.perf_counter()
    pipeline, request, n_buckets = build(args, settings)
    row = {"load_s": time.perf_counter() - t0, "compile": pipeline.compile_scope, "buckets": n_buckets}
    row["warm_s"] = pipeline.warm()
    for key in ("first_job_s", "second_job_s"):
        t0 = time.perf_counter()
        pipeline.generate(request)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row[key] = time.perf_counter() - t0
    args.child.write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    settings = dict(kv.split("=", 1) for kv in args.set)
    rows = []
    with tempfile.TemporaryDirectory(prefix="k5-compile-cache-") as scratch:
        # An explicit K5_COMPILE_CACHE_DIR (a volume to keep) is used as given; otherwise a fresh, empty one.
        cache = settings.get("compile_cache_dir") or str(Path(scratch) / "cache")
        passthrough = [a for kv in args.set if not kv.startswith("compile_cache_dir=") for a in ("--set", kv)]
        mode = ["--tiny"] if args.tiny else ["--full", "--model", args.model, "--frames", str(args.frames)]
        for run in range(1, args.runs + 1):
            had_cache = Path(cache).exists() and any(Path(cache).iterdir())
            out = Path(scratch) / f"run{run}.json"
            cmd = [sys.executable, __file__, *mode, "--steps", str(args.steps), *passthrough]
            cmd += ["--set", f"compile_cache_dir={cache}", "--child", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-4000:])
                return done.returncode
            row = {"run": run, "cache": "warm" if had_cache else "empty", **json.loads(out.read_text())}
            rows.append(row)
            print(f"run {run}: done", file=sys.stderr, flush=True)
    print(report.table(rows, COLUMNS))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: the seed's documented diffusers usage vs k5serve's worker configuration, in one process.

    python bench/pipeline.py --tiny [--json out.json]            # CPU, tiny random-weight model, seconds
    python bench/pipeline.py --full --model lite --frames 121    # GPU, full-size Lite with random weights
    python bench/pipeline.py --flop-check                        # FLOP model vs a meta-device count (instant)
    python bench/pipeline.py --table a.json b.json               # one table from several runs

Per case it runs the baseline first, then builds k5serve's VideoPipeline on the same components (compiling or
hooking them in place), so both see identical weights. `ours+KEY=VALUE` adds a run of the worker with other settings
on the same weights and seed, e.g. `--configs baseline,ours,ours+step_cache=taylorseer`: its row also says how much
faster it is than plain `ours` and how far its frames moved from ours' (PSNR). See BENCHMARKS.md for the columns.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import flops, report, runs  # noqa: E402
from bench.configs import VARIANTS, Case, build_pipeline  # noqa: E402
from service.contract.settings import Settings  # noqa: E402
from worker.pipeline import pick_dtype  # noqa: E402
from worker.textcache import DEFAULT_NEGATIVE_PROMPT  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tiny", action="store_true", help="tiny model, tiny shapes (CPU seconds)")
    mode.add_argument("--full", action="store_true", help="full-size architecture at production shapes (GPU)")
    mode.add_argument("--flop-check", action="store_true", help="FLOP model vs FlopCounterMode, meta device")
    mode.add_argument("--table", nargs="+", type=Path, metavar="JSON", help="print the table of saved runs")
    p.add_argument("--model", choices=["lite", "pro"], default="lite", help="--full: which architecture")
    p.add_argument("--size", default=None, help="WxH (default 768x512 full; tiny: 96x64 dense, 128x128 NABLA)")
    p.add_argument("--frames", default=None, help="comma-separated frame counts (full default 121,241; tiny 9)")
    p.add_argument("--attention", choices=["auto", "dense", "nabla"], default="auto",
                   help="auto: as published (NABLA only for 10 s Lite); tiny runs one case of each")  # fmt: skip
    p.add_argument("--variants", default="sft", help=f"comma-separated of {','.join(VARIANTS)}")
    p.add_argument("--nabla-mask", default="random",
                   help="NABLA: random (random weights' mask), sta (fixed at trained density)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="steps timed (default: the variant's; tiny: 2)")
    p.add_argument("--configs", default="baseline,ours,ours+diffusers_sampling",
                   help="comma-separated: baseline, ours, ours+KEY=VALUE[+KEY=VALUE] (other settings); "
                        "+diffusers_sampling = diffusers' grid, bf16 timestep and template")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="k5serve setting for 'ours'")
    p.add_argument("--enhance", action="store_true", help="ours expands the prompt (off: baseline does not)")
    p.add_argument("--upload-dir", type=Path, help="time an upload of the MP4 to this local directory")
    p.add_argument("--smoke", action="store_true", help="--full at full width but 2 blocks (wiring check on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="save rows and metadata here")
    return p.parse_args(argv)


def cases(args: argparse.Namespace) -> list[Case]:
    out = []
    for variant in args.variants.split(","):
        if args.tiny:
            frames = [int(f) for f in (args.frames or "9").split(",")]
            for nabla in {"auto": [False, True], "dense": [False], "nabla": [True]}[args.attention]:
                w, h = map(int, (args.size or ("128x128" if nabla else "96x64")).split("x"))
                out += [Case("tiny", w, h, n, nabla, variant, m) for n in frames for m in masks(args, nabla)]
        else:
            w, h = map(int, (args.size or "768x512").split("x"))
            for n in [int(f) for f in (args.frames or "121,241").split(",")]:
                nabla = n > 121 and args.model == "lite" if args.attention == "auto" else args.attention == "nabla"
                out += [Case(args.model, w, h, n, nabla, variant, m) for m in masks(args, nabla)]
    return out


def masks(args: argparse.Namespace, nabla: bool) -> list[str]:
    return args.nabla_mask.split(",") if nabla else ["random"]


def steps_for(config: str, args: argparse.Namespace, steps_full: int) -> int:
    """Timed steps of one configuration. A step cache's speed-up depends on its schedule over the whole run (which
    steps it computes, skips or predicts), so its rows, and the plain `ours` they are compared with, run the
    variant's full step count."""
    if args.tiny:
        return args.steps or 2
    cached = any("step_cache=" in c and "step_cache=off" not in c for c in args.configs.split(","))
    return steps_full if cached and config.startswith("ours") else (args.steps or steps_full)


def text_tokens(pipe, prompt: str, max_sequence_length: int = 512) -> int:
    """Qwen tokens the transformer sees for a prompt (what the pipeline keeps after the system prefix)."""
    ids = pipe.tokenizer(text=[pipe.prompt_template.format(prompt)])["input_ids"][0]
    return min(len(ids) - pipe.prompt_template_encode_start_idx, max_sequence_length)


def finish_row(row: dict, frames, case: Case, pipe, ceiling: float, video_steps: int, kept: float | None, args):
    """MP4 encode and upload timings, then the derived columns: s/video, TFLOP/s, % of ceiling, x floor.
    NABLA's FLOPs need its kept fraction, measured on 'ours' (same weights, same masks as the baseline's)."""
    try:
        from worker import encode  # PyAV; the GPU hosts may lack it (BENCHMARKS.md: bring its wheel)
    except ImportError as e:
        encode, row["mp4_note"] = None, f"MP4 not timed: {e}"
    with tempfile.TemporaryDirectory(prefix="k5bench-") as tmp:
        path = Path(tmp) / "video.mp4"
        t0 = time.perf_counter()
        if encode is not None:
            encode.write_mp4(frames, path, fps=24)
            row["mp4_s"] = time.perf_counter() - t0
        if args.upload_dir and encode is not None:
            from service.contract.storage import LocalStorage

            t0 = time.perf_counter()
            LocalStorage(args.upload_dir).put_file(f"bench/{row['config']}.mp4", path, "video/mp4")
            row["upload_s"] = time.perf_counter() - t0
    row["video_s"] = row["text_encode_s"] + row["step_s"] * video_steps + row["decode_s"]
    row["video_s"] += (row.get("mp4_s") or 0.0) + (row.get("upload_s") or 0.0)
    row["peak_gib"] = row["peak_gpu_memory_bytes"] / 2**30 if row.get("peak_gpu_memory_bytes") else None
    if row.get("enhance_s"):  # prompt expansion's share of the video (--enhance): what its default is chosen by
        row["enhance_pct"] = 100 * row["enhance_s"] / row["video_s"]
    if case.nabla and kept is None:
        return  # no FLOP count without the kept fraction: run 'ours' too
    guidance = VARIANTS[case.variant][1]
    config = dict(pipe.transformer.config)
    n = ((case.frames - 1) // 4 + 1) * (case.height // 16) * (case.width // 16)
    kept = kept if case.nabla else 1.0
    per_step = flops.transformer_flops(config, n, text_tokens(pipe, runs.PROMPT), kept)["total"]
    if guidance > 1.0:
        per_step += flops.transformer_flops(config, n, text_tokens(pipe, DEFAULT_NEGATIVE_PROMPT), kept)["total"]
    vae = flops.vae_decode_flops((case.frames - 1) // 4 + 1, case.height // 8, case.width // 8, pipe.vae.config)
    row["tflops"] = per_step / row["step_s"] / 1e12
    row["ceiling_pct"] = 100 * per_step / row["step_s"] / ceiling
    row["floor_s"] = (per_step * video_steps + vae) / ceiling
    row["x_floor"] = row["video_s"] / row["floor_s"]


# Named groups of settings a configuration can add: the three sampling departures from diffusers' pipeline
# (worker/sampling.py), so one row shows upstream's sampling and the next diffusers' on the same weights.
ALIASES = {
    "diffusers_sampling": ["sampling_grid=diffusers", "timestep_precision=model", "prompt_template=diffusers"],
}


def settings_for(args, overrides: list[str]) -> Settings:
    """The worker's settings for one 'ours' configuration: --set, then the configuration's own KEY=VALUEs."""
    values = {"enhance_prompt": "on" if args.enhance else "off"}
    expanded = [kv for item in [*args.set, *overrides] for kv in ALIASES.get(item, [item])]
    values.update(kv.split("=", 1) for kv in expanded)
    return Settings(**values)


def psnr(frames, reference) -> float:
    """PSNR in dB of uint8 frames against a reference (inf: identical)."""
    mse = float(np.mean((frames.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def compare_to_ours(rows: list[dict], outputs: list[tuple[dict, object]]) -> None:
    """Later `ours` rows (`ours+...`, or plain `ours` again) against the first plain `ours` on the same weights and
    seed: how fast, and how far their frames moved."""
    ref = next(((row, frames) for row, frames in outputs if row["config"] == "ours"), None)
    if ref is None:
        return
    for row, frames in outputs:
        if row is not ref[0] and row["config"].startswith("ours") and row.get("video_s") and ref[0].get("video_s"):
            row["vs_ours"] = row["video_s"] / ref[0]["video_s"]
            row["psnr_vs_ours_db"] = psnr(frames, ref[1])


def run_case(case: Case, args, device: torch.device, dtype: torch.dtype, ceiling: float) -> list[dict]:
    steps_full, guidance, _ = VARIANTS[case.variant]
    video_steps = args.steps or 2 if args.tiny else steps_full
    pipe = build_pipeline(case, device, dtype, smoke=args.smoke)
    pipe.set_progress_bar_config(disable=True)
    rows: list[dict] = []
    outputs: list[tuple[dict, object]] = []  # (row, frames) of the configurations that ran
    for config in args.configs.split(","):
        row = {"case": case.name, "config": config}
        name, *overrides = config.split("+")
        steps = steps_for(config, args, steps_full)
        try:
            if name == "baseline":
                frames, stats = runs.baseline(pipe, case, steps, guidance, device, args.seed)
                if hasattr(pipe, "remove_all_hooks"):
                    pipe.remove_all_hooks()  # undo model CPU offload before 'ours' takes the components
                pipe.transformer._compiled_call_impl = None  # undo the NABLA baseline's compile for 'ours'
            else:
                settings = settings_for(args, overrides)
                frames, stats, pipeline = runs.ours(pipe, case, steps, guidance, device, args.seed, settings)
                pipeline.step_cache.remove()  # the next configuration gets the transformer as it was
                pipeline.sampling.remove()  # ... and the scheduler and prompt template
                if case.nabla:
                    values = runs.nabla_kept(pipeline, case, guidance, args.seed)
                    stats["kept_mean"] = sum(values) / len(values)
                    stats["nabla_kept"] = f"{min(values):.3f}-{max(values):.3f} (mean {stats['kept_mean']:.3f})"
                    stats["sta_kept"] = flops.sta_fraction(pipe, case.width, case.height, case.frames)
            row.update(stats)
            outputs.append((row, frames))
        except Exception as e:  # a configuration that fails (e.g. OOM) is a result, not the end of the benchmark
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"{case.name} / {config}: {row.get('error') or 'done'}", file=sys.stderr, flush=True)
    kept = next((r["kept_mean"] for r in rows if "kept_mean" in r), None)
    for row, frames in outputs:
        finish_row(row, frames, case, pipe, ceiling, video_steps, kept, args)
    compare_to_ours(rows, outputs)
    del pipe
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if unknown := [c for c in args.configs.split(",") if c.split("+")[0] not in ("baseline", "ours")]:
        raise SystemExit(f"unknown configuration(s): {', '.join(unknown)} (baseline, ours or ours+KEY=VALUE)")
    if args.table:
        print(report.merge(args.table))
        return 0
    if args.flop_check:
        print(json.dumps(flops.check_full_size("lite"), indent=2))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype(Settings(), device)
    ceiling = flops.matmul_ceiling(device, dtype)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "ceiling_tflops": ceiling / 1e12,
        "steps": args.steps or (2 if args.tiny else "variant"),
        "video_steps": "timed" if args.tiny else "variant",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    rows: list[dict] = []
    for case in cases(args):
        rows += run_case(case, args, device, dtype, ceiling)
        report.add_ratios(rows)
        if args.json:
            # After every case: a command cut off by its time limit still leaves the cases it finished.
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    print(report.notes(meta) + "\n\n" + report.table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak host memory of loading a full-size Lite checkpoint, against the size of its weights.

    python bench/load_memory.py --build /tmp/lite        # random weights from the real configs, saved (once)
    python bench/load_memory.py --measure /tmp/lite      # each loader in a fresh process: peak RSS vs weights

The checkpoint has the real Lite transformer (2.0 B parameters, bf16 with its fp32-kept modulations), the real
HunyuanVideo VAE and the real CLIP text tower; `--qwen tiny` (the default) puts the tiny Qwen2.5-VL in place of
the 7B one (16.6 GB in bf16), for machines with less memory than that: its share is then added by arithmetic.
Loaders: the worker's (worker/loader.py, component by component, CLIP in fp32) and diffusers' whole-pipeline
`from_pretrained`. On a CPU every component ends in host memory either way; what this measures is whether
loading holds a transient second copy (peak / weights > 1).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(out: Path, qwen: str) -> None:
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline
    from transformers import CLIPTextModel, Qwen2_5_VLForConditionalGeneration

    from bench.configs import build_transformer, clip_config, qwen_config
    from worker.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline("t2v")
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    text_encoder = tiny.text_encoder
    if qwen == "full":
        text_encoder = Qwen2_5_VLForConditionalGeneration(qwen_config(tiny.tokenizer)).to(bf16).eval()
    pipe = Kandinsky5T2VPipeline(
        transformer=build_transformer("lite", False, cpu, bf16),
        vae=AutoencoderKLHunyuanVideo().to(bf16).eval(),
        text_encoder=text_encoder,
        tokenizer=tiny.tokenizer,
        text_encoder_2=CLIPTextModel(clip_config(tiny.tokenizer_2)).eval(),
        tokenizer_2=tiny.tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=10.0),
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def load_once(folder: Path, how: str) -> dict:
    import torch
    from diffusers import Kandinsky5T2VPipeline

    from worker import loader

    base = _rss()
    if how == "worker":
        components = loader.load_components(folder, torch.device("cpu"), torch.bfloat16, torch.device("cpu"))
        pipe = Kandinsky5T2VPipeline(**components)
    else:
        pipe = Kandinsky5T2VPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    # safetensors maps the files: untouched weights are not resident yet. Read every tensor once, as the first
    # forward (or a copy to the GPU) does, and take the peak again.
    with torch.no_grad():
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            for t in getattr(pipe, name).state_dict().values():
                t.float().sum() if t.numel() < 2**24 else t.view(-1)[:: 4096 // t.element_size()].sum()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    weights = {
        n: sum(t.numel() * t.element_size() for t in getattr(pipe, n).state_dict().values())
        for n in ("transformer", "vae", "text_encoder", "text_encoder_2")
    }
    gb = {n: b / 1e9 for n, b in weights.items()}
    return {"loader": how, "after_load_gb": loaded / 1e9, "peak_gb": peak / 1e9, "weights_gb": gb}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path)
    p.add_argument("--qwen", choices=["tiny", "full"], default="tiny")
    p.add_argument("--measure", type=Path)
    p.add_argument("--one", nargs=2, metavar=("DIR", "LOADER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:
        build(args.build, args.qwen)
        return 0
    if args.one:
        print(json.dumps(load_once(Path(args.one[0]), args.one[1])))
        return 0
    print("| loader | weights GB | RSS after load GB | peak RSS, weights read GB | peak / weights |")
    print("|---|---|---|---|---|")
    for how in ("worker", "from_pretrained"):
        cmd = [sys.executable, __file__, "--one", str(args.measure), how]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"| {how} | error: {out.stderr.strip().splitlines()[-1]} | - | - |")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        total = sum(row["weights_gb"].values())
        cells = [how, f"{total:.2f}", f"{row['after_load_gb']:.2f}", f"{row['peak_gb']:.2f}"]
        print("| " + " | ".join(cells) + f" | {row['peak_gb'] / total:.2f} |", flush=True)
        print(json.dumps(row), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

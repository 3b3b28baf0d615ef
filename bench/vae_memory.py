"""Peak memory of the HunyuanVideo VAE decode, as diffusers runs it (5 latent frames per chunk, untiled).

    python bench/vae_memory.py --sizes 64x64,128x128 --frames 17,33,65 [--json out.json]   # CPU: peak RSS
    python bench/vae_memory.py --sizes 768x512,512x512 --frames 121,241                     # GPU: allocator peak

Each (size, frames) runs in a fresh process with the real VAE architecture (diffusers' default config, random
weights), so a CPU measurement is its own peak RSS minus the RSS before the decode, and a GPU one is
torch.cuda.max_memory_allocated minus the weights. The table gives the peak per pixel of one decoded frame in
units of one 128-channel activation (`k`), which is what worker/speed.py's auto-tiling rule uses.
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


def measure(width: int, height: int, frames: int, dtype_name: str) -> dict:
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo().to(device=device, dtype=dtype).eval()
    latent = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    with torch.inference_mode():
        out = vae.decode(latent).sample
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    unit = height * width * 128 * torch.finfo(dtype).bits // 8  # one 128-channel full-resolution frame
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": dtype_name,
        "size": f"{width}x{height}",
        "frames": frames,
        "out_frames": out.shape[2],
        "peak_gib": peak / 2**30,
        "k": peak / unit,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64x64,128x128")
    p.add_argument("--frames", default="17,33,65")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # WxHxF in this process (the child)
    args = p.parse_args(argv)
    if args.one:
        w, h, n = map(int, args.one.split("x"))
        print(json.dumps(measure(w, h, n, args.dtype)))
        return 0
    import torch

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    rows = []
    for size in args.sizes.split(","):
        for frames in args.frames.split(","):
            one = f"{size}x{frames}"
            cmd = [sys.executable, __file__, "--one", one, "--dtype", dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                rows.append({"size": size, "frames": int(frames), "error": out.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print("| device | dtype | size | frames | peak GiB | k (128-ch frames) |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| - | - | {r['size']} | {r['frames']} | error: {r['error']} | - |")
        else:
            cells = [r["device"], r["dtype"], r["size"], r["frames"], f"{r['peak_gib']:.3f}", f"{r['k']:.1f}"]
            print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Frames -> an H.264 MP4, a WebP thumbnail and a JPEG spritesheet."""

from __future__ import annotations

import functools
import math
import platform
from pathlib import Path

import av
import numpy as np
from PIL import Image


@functools.cache
def x264_params() -> str | None:
    """libx264's options beyond crf and preset: on an x86 CPU with AVX-512, its SIMD capped at AVX2.

    With AVX-512 on, libx264 (as built into PyAV's wheel) does not encode identical frames into identical bits:
    30 encodes of the same 25 smooth 96x64 frames gave 2 to 14 different streams, decoding to different frames,
    and the macroblock-tree rate control (mbtree, rc-lookahead) is the part that varies: with it off, or with
    asm=0 or asm=avx2, every encode was the same (tests/test_encode.py). Capping the SIMD keeps mbtree's
    quality, costs no measurable speed (0.24 s vs 0.37 s default for 25 frames of 384x256 here), and makes the
    same frames the same MP4, which a resumed job's byte-identity and users comparing seeds rely on. Every
    AVX-512 CPU has AVX2; other CPUs keep libx264's own choice."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return "asm=avx2" if "avx512f" in flags.split() else None


def write_mp4(frames: np.ndarray, path: Path, fps: int = 24, crf: int = 18, preset: str = "medium") -> None:
    """frames: uint8 (T, H, W, 3). H.264 yuv420p plays everywhere (browsers, phones, QuickTime). The same frames
    always give the same file (x264_params)."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even sides, got {w}x{h}")
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        if (params := x264_params()) is not None:
            stream.options = {**stream.options, "x264-params": params}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_thumbnail(frames: np.ndarray, path: Path) -> None:
    """The middle frame as WebP, at the video's size."""
    Image.fromarray(frames[len(frames) // 2]).save(path, format="WEBP", quality=85)


def write_spritesheet(frames: np.ndarray, path: Path, tiles: int = 16, tile_width: int = 160) -> None:
    """Up to `tiles` evenly spaced frames in a near-square grid, each scaled down to at most tile_width px."""
    t, h, w, _ = frames.shape
    n = min(tiles, t)
    picks = np.linspace(0, t - 1, n).round().astype(int)
    scale = min(1.0, tile_width / w)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * tw, rows * th))
    for k, idx in enumerate(picks):
        tile = Image.fromarray(frames[idx]).resize((tw, th), Image.Resampling.BILINEAR)
        sheet.paste(tile, ((k % cols) * tw, (k // cols) * th))
    sheet.save(path, format="JPEG", quality=85)

"""The benchmark's table: one row per (case, configuration), markdown so it pastes into BENCHMARKS.md."""

from __future__ import annotations

import json
import math
from pathlib import Path

# (column title, row key, format)
COLUMNS = [
    ("case", "case", "{}"),
    ("config", "config", "{}"),
    ("attention", "attention", "{}"),
    ("compile", "compile", "{}"),
    ("sampling", "sampling", "{}"),  # grid / timestep precision / prompt template (worker/sampling.py)
    ("warm-up s", "warm_s", "{:.2f}"),
    ("text s", "text_encode_s", "{:.3f}"),
    ("steps", "steps", "{}"),
    ("s/step", "step_s", "{:.3f}"),
    ("decode s", "decode_s", "{:.3f}"),
    ("mp4 s", "mp4_s", "{:.3f}"),
    ("upload s", "upload_s", "{:.3f}"),
    ("s/video", "video_s", "{:.2f}"),
    ("expand %", "enhance_pct", "{:.1f}"),
    ("peak GiB", "peak_gib", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.3g}"),
    ("% of matmul", "ceiling_pct", "{:.1f}"),
    ("x floor", "x_floor", "{:.2f}"),
    ("NABLA kept", "nabla_kept", "{}"),
    ("ours/baseline", "vs_baseline", "{:.2f}"),
    ("/ours", "vs_ours", "{:.2f}"),
    ("PSNR vs ours dB", "psnr_vs_ours_db", "{:.1f}"),
]
NUMERIC = [key for _, key, fmt in COLUMNS if fmt != "{}"]


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if value == math.inf:  # a PSNR of identical frames
        return "identical"
    return fmt.format(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, fmt) for _, key, fmt in columns) + " |")
    errors = [f"- {r['case']} / {r['config']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + ([""] + errors if errors else []))


def notes(meta: dict) -> str:
    return (
        f"device: {meta['device']}; torch {meta['torch']}, diffusers {meta['diffusers']}, "
        f"transformers {meta['transformers']}; matmul ceiling {meta['ceiling_tflops']:.3g} TFLOP/s ({meta['dtype']}); "
        f"steps timed {meta['steps']}, s/video extrapolated to {meta['video_steps']} steps; {meta['date']}"
    )


def add_ratios(rows: list[dict]) -> None:
    """ours/baseline on each non-baseline row: seconds per video, <1 is faster."""
    baseline = {r["case"]: r for r in rows if r["config"] == "baseline" and r.get("video_s")}
    for row in rows:
        base = baseline.get(row["case"])
        if row["config"] != "baseline" and base and row.get("video_s"):
            row["vs_baseline"] = row["video_s"] / base["video_s"]


def all_finite(rows: list[dict]) -> bool:
    """Every timing and ratio is a finite number (a PSNR may be inf: identical frames)."""
    return all(
        isinstance(r[k], int | float) and math.isfinite(r[k])
        for r in rows
        if not r.get("error")
        for k in NUMERIC
        if r.get(k) is not None and k != "psnr_vs_ours_db"
    )


def nabla_speedups(rows: list[dict]) -> list[str]:
    """Dense over NABLA time for each case and configuration run both ways (the 10 s models' >= 2x target)."""
    by_key: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        shape, _, attention = row["case"].rpartition(" ")
        if row.get("step_s") and attention in ("dense", "nabla"):
            by_key.setdefault((shape, row["config"]), {})[attention] = row
    lines = []
    for (shape, config), pair in by_key.items():
        if len(pair) == 2:
            dense, nabla = pair["dense"], pair["nabla"]
            step = dense["step_s"] / nabla["step_s"]
            video = dense["video_s"] / nabla["video_s"] if dense.get("video_s") and nabla.get("video_s") else None
            lines.append(
                f"- {shape} / {config}: NABLA {step:.2f}x faster per step"
                + (f", {video:.2f}x per video" if video else "")
                + f" (s/step dense {dense['step_s']:.3f}, NABLA {nabla['step_s']:.3f})"
            )
    return lines


def merge(paths: list[Path]) -> str:
    """Tables of several --json files (a GPU session runs one case per command), then dense vs NABLA."""
    parts, rows = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        parts.append(f"{path}: {notes(data['meta'])}\n\n{table(data['rows'])}")
        rows += data["rows"]
    if speedups := nabla_speedups(rows):
        parts.append("Dense vs NABLA attention:\n" + "\n".join(speedups))
    return "\n\n".join(parts)

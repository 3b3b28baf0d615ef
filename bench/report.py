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
    ("warm-up s", "warm_s", "{:.2f}"),
    ("text s", "text_encode_s", "{:.3f}"),
    ("steps", "steps", "{}"),
    ("s/step", "step_s", "{:.3f}"),
    ("decode s", "decode_s", "{:.3f}"),
    ("mp4 s", "mp4_s", "{:.3f}"),
    ("upload s", "upload_s", "{:.3f}"),
    ("s/video", "video_s", "{:.2f}"),
    ("peak GiB", "peak_gib", "{:.2f}"),
    ("TFLOP/s", "tflops", "{:.3g}"),
    ("% of matmul", "ceiling_pct", "{:.1f}"),
    ("x floor", "x_floor", "{:.2f}"),
    ("NABLA kept", "nabla_kept", "{}"),
    ("ours/baseline", "vs_baseline", "{:.2f}"),
]
NUMERIC = [key for _, key, fmt in COLUMNS if fmt != "{}"]


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key, fmt) for _, key, fmt in COLUMNS) + " |")
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
    return all(
        isinstance(r[k], int | float) and math.isfinite(r[k])
        for r in rows
        if not r.get("error")
        for k in NUMERIC
        if r.get(k) is not None
    )


def merge(paths: list[Path]) -> str:
    """Tables of several --json files (a GPU session runs one case per command)."""
    parts = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        parts.append(f"{path}: {notes(data['meta'])}\n\n{table(data['rows'])}")
    return "\n\n".join(parts)

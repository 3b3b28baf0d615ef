"""bench/pipeline.py keeps running: `--tiny` on this CPU produces a full, finite table, and the FLOP model agrees
with torch's own count at full size. Speed-ups are not asserted: CPU timings of a tiny model say nothing about a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import flops, report
from bench.configs import transformer_config

# The benchmark scripts, run as real processes on the tiny models.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    done = subprocess.run(
        [sys.executable, "bench/pipeline.py", "--tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_tiny_table_has_every_row_and_column(tiny_run):
    data, stdout = tiny_run
    rows = data["rows"]
    assert [(r["case"].split()[-1], r["config"]) for r in rows] == [
        ("dense", "baseline"),
        ("dense", "ours"),
        ("dense", "ours+diffusers_sampling"),
        ("nabla", "baseline"),
        ("nabla", "ours"),
        ("nabla", "ours+diffusers_sampling"),
    ]
    assert not [r["error"] for r in rows if r.get("error")]
    header = stdout.splitlines()[2]
    assert all(title in header for title, _, _ in report.COLUMNS)
    assert stdout.count("| tiny-sft ") == 6
    # Upstream's sampling and diffusers' side by side, on the same weights and seed: the frames differ.
    by_config = {r["config"]: r for r in rows if r["case"].endswith("dense")}
    assert by_config["ours"]["sampling"] == "upstream/float32/upstream"
    assert by_config["ours+diffusers_sampling"]["sampling"] == "diffusers/model/diffusers"
    assert 0 < by_config["ours+diffusers_sampling"]["psnr_vs_ours_db"] < math.inf

    required = ["text_encode_s", "step_s", "denoise_s", "decode_s", "mp4_s", "video_s", "tflops", "ceiling_pct"]
    for row in rows:
        for key in [*required, "x_floor", "floor_s"]:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["config"], key)
        assert row["steps"] == 2
        assert row["peak_gpu_memory_bytes"] is None  # CPU
    assert report.all_finite(rows)
    ours = [r for r in rows if r["config"] == "ours"]
    assert all(math.isfinite(r["vs_baseline"]) and r["warm_s"] >= 0 for r in ours)
    nabla = ours[1]
    # NABLA's block masks need flex on the visual self-attention only; the other layers keep the dense kernel.
    assert nabla["attention"] == "native (visual self-attention: flex)"
    assert 0 < nabla["kept_mean"] <= 1 and 0 < nabla["sta_kept"] <= 1
    # The baseline runs NABLA as documented (flex + compile) where it can; on a CPU it says it ran eager.
    nabla_baseline = next(r for r in rows if r["case"].endswith("nabla") and r["config"] == "baseline")
    assert nabla_baseline["attention"].startswith("flex (eager") and nabla_baseline["compile"] == "off"
    assert data["meta"]["ceiling_tflops"] > 0 and data["meta"]["device"].startswith("CPU")


def test_step_cache_rows_say_their_speed_and_how_far_the_frames_moved(tmp_path):
    """`ours+KEY=VALUE` runs the worker with other settings on the same weights and seed. TaylorSeer predicts most
    steps after its warm-up, so its frames differ from uncached ours; recomputing more often keeps them closer."""
    out = tmp_path / "cache.json"
    configs = "ours,ours+step_cache=taylorseer,ours+step_cache=taylorseer+step_cache_interval=2,ours"
    done = subprocess.run(
        [sys.executable, "bench/pipeline.py", "--tiny", "--attention", "dense", "--steps", "8", "--configs", configs,
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    plain, every5, every2, again = rows
    assert not [r["error"] for r in rows if r.get("error")]
    for cached in (every5, every2):
        assert math.isfinite(cached["vs_ours"]) and cached["vs_ours"] > 0
        assert 10 < cached["psnr_vs_ours_db"] < math.inf
    assert every2["psnr_vs_ours_db"] > every5["psnr_vs_ours_db"]
    # The cache came off the transformer again: a later plain run reproduces the first one exactly.
    assert again["psnr_vs_ours_db"] == math.inf and "psnr_vs_ours_db" not in plain
    assert "PSNR vs ours dB" in done.stdout

    bad = subprocess.run([sys.executable, "bench/pipeline.py", "--tiny", "--configs", "ours,fast"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "unknown configuration(s): fast" in bad.stderr


def test_saved_runs_print_as_one_table(tiny_run, tmp_path):
    data, _ = tiny_run
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(data))
    merged = report.merge([saved, saved])  # what `--table a.json b.json` prints
    assert merged.count("| tiny-sft ") == 12 and merged.count("matmul ceiling") == 2


def test_merged_table_compares_dense_and_nabla_runs_of_one_shape(tmp_path):
    rows = [
        {"case": "lite-sft 768x512x241 dense", "config": "ours", "step_s": 6.0, "video_s": 400.0},
        {"case": "lite-sft 768x512x241 nabla", "config": "ours", "step_s": 2.0, "video_s": 160.0},
        {"case": "lite-sft 768x512x241 nabla", "config": "baseline", "step_s": 3.0, "video_s": 200.0},
    ]
    meta = {"device": "d", "torch": "t", "diffusers": "x", "transformers": "y", "ceiling_tflops": 1.0,
            "dtype": "bfloat16", "steps": 5, "video_steps": "variant", "date": "today"}  # fmt: skip
    paths = []
    for i, part in enumerate((rows[:1], rows[1:])):  # one case per command, as a GPU session runs them
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"meta": meta, "rows": part}))
    merged = report.merge(paths)
    assert "- lite-sft 768x512x241 / ours: NABLA 3.00x faster per step, 2.50x per video" in merged
    assert "/ baseline: NABLA" not in merged  # no dense baseline to compare with


def test_flop_model_matches_torch_count_and_reference():
    check = flops.check_full_size("lite", width=768, height=512, frames=121, text=256)
    assert check["visual_tokens"] == 47_616  # 31 x 32 x 48 (after 1x2x2 patching)
    assert check["params_b"] == pytest.approx(2.0, abs=0.05)
    analytic = check["analytic_tflop"]
    assert analytic["total"] == pytest.approx(check["counted_tflop"], rel=1e-4)
    # By hand: about 660 TFLOP per forward (linear 137, self-attention 520, cross-attention 3); VAE ~1.2 PFLOP.
    assert analytic["total"] == pytest.approx(660, rel=0.01)
    assert analytic["linear"] == pytest.approx(137, rel=0.01)
    assert analytic["self_attention"] == pytest.approx(520, rel=0.01)
    assert check["vae_decode_pflop"] == pytest.approx(1.2, rel=0.05)


def test_nabla_scales_only_self_attention():
    config = transformer_config("lite", nabla=True)
    dense = flops.transformer_flops(config, 47_616, 256)
    sparse = flops.transformer_flops(config, 47_616, 256, kept=0.09)
    assert sparse["linear"] == dense["linear"] and sparse["cross_attention"] == dense["cross_attention"]
    assert sparse["self_attention"] == pytest.approx(0.09 * dense["self_attention"])


def test_warmup_bench_runs_fresh_processes_and_times_two_jobs(tmp_path):
    """bench/warmup.py keeps running (compile off here: Inductor's CPU build of even the tiny model takes minutes;
    BENCHMARKS.md has that measurement)."""
    out = tmp_path / "warmup.json"
    done = subprocess.run(
        [sys.executable, "bench/warmup.py", "--tiny", "--runs", "2", "--set", "compile_transformer=off",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == [1, 2]
    for row in rows:
        assert row["compile"] == "off" and row["buckets"] == 6
        for key in ("load_s", "warm_s", "first_job_s", "second_job_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
    assert rows[0]["cache"] == "empty"
    assert "| first job s |" in done.stdout


def test_nabla_masks_and_step_counts_of_the_gpu_rows():
    from bench import pipeline

    args = pipeline.parse_args(["--full", "--frames", "121,241", "--nabla-mask", "random,sta", "--steps", "3",
                                "--configs", "baseline,ours,ours+step_cache=taylorseer"])  # fmt: skip
    cases = pipeline.cases(args)
    assert [(c.frames, c.nabla, c.mask) for c in cases] == [(121, False, "random"), (241, True, "random"),
                                                            (241, True, "sta")]  # fmt: skip
    assert cases[1].nabla_p == 0.9 and cases[2].nabla_p < 0.01 and cases[2].name.endswith("nabla sta-mask")
    assert transformer_config("lite", True, p=cases[2].nabla_p)["attention_P"] == cases[2].nabla_p
    # A step cache's rows, and the plain ours they are compared with, run the variant's full schedule.
    assert pipeline.steps_for("baseline", args, 50) == 3
    assert pipeline.steps_for("ours", args, 50) == pipeline.steps_for("ours+step_cache=taylorseer", args, 50) == 50
    plain = pipeline.parse_args(["--full", "--steps", "3"])
    assert pipeline.steps_for("ours", plain, 50) == 3

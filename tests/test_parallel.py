"""One video on several ranks (K5_PARALLEL, worker/parallel.py and worker/ranks.py), on gloo with the tiny model:
the frames equal the single-process frames, a killed rank ends in a requeue and a restarted group, and layouts that
cannot work are refused at start-up with the fix named."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from service.console.localstack import free_port, stop_process
from service.contract.jobs import JobStore, asset_key, plan_job
from service.contract.lifecycle import Lifecycle
from service.contract.models import SPEC_FILE, resolve_model
from service.contract.parallel import Layout, parse
from service.contract.record import GenerationRequest
from service.contract.schemas import VideoCreate
from service.contract.settings import Settings
from service.contract.storage import open_storage
from tests import parallel_group
from tests.conftest import ROOT
from tests.test_recovery import new_job
from tests.waiting import wait_until
from worker import parallel, splits
from worker.pipeline import VideoPipeline
from worker.speed import ConfigError

REQUEST = GenerationRequest(
    prompt="a red fox running through the snow",
    width=96,
    height=64,
    num_frames=25,
    num_inference_steps=2,
    guidance_scale=5.0,
    seed=7,
)


def test_layouts_parse_to_one_canonical_form_and_bad_ones_name_the_fix():
    assert parse("sp=4, cfg=2") == Layout(cfg=2, sp=4) and Layout(cfg=2, sp=4).describe() == "cfg=2,sp=4"
    assert parse("none").world == 1 and parse("sp=8,ring=2").ulysses == 4
    assert Settings(parallel="sp=2,cfg=2").parallel == "cfg=2,sp=2"
    for bad, says in [
        ("tp=2", "not one of"),
        ("cfg=3", "cfg is 1 or 2"),
        ("sp=4,ring=3", "must divide"),
        ("cfg=2,sp=8", "at most 8"),
        ("sp=two", "positive integer"),
        ("sp=2,sp=2", "twice"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse(bad)


def _rank(layout: str, transformer) -> parallel.Rank:
    # enable_sequence_parallel checks the checkpoint before it touches a process group or the mesh.
    return parallel.Rank(0, parse(layout), torch.device("cpu"), control=None, mesh=None)


def test_sequence_parallel_refuses_nabla_and_head_counts_ulysses_cannot_split():
    from diffusers import Kandinsky5Transformer3DModel

    from worker.tiny import _transformer

    tiny = _transformer()  # 2 heads
    with pytest.raises(ConfigError, match="2 attention heads"):
        splits.enable_sequence_parallel(tiny, _rank("sp=4", tiny), "native", [(96, 64, 25)])
    nabla = Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=8, in_text_dim2=8, time_dim=16, model_dim=32, ff_dim=32,
        num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6), attention_type="nabla",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="NABLA"):
        splits.enable_sequence_parallel(nabla, _rank("sp=2", nabla), "flex", [(128, 128, 25)])
    with pytest.raises(ConfigError, match="log-sum-exp"):
        splits.enable_sequence_parallel(tiny, _rank("sp=2,ring=2", tiny), "native", [(96, 64, 25)])


@pytest.mark.slow
def test_cfg_and_sequence_parallel_on_four_ranks_give_the_single_process_frames(tiny_models, tmp_path):
    """cfg=2 x sp=2 on gloo: byte-identical. CFG-parallel runs each forward unchanged on one rank. The Ulysses
    split changes which rows each GEMM sees and moves whole heads between ranks, but every output element is still
    the same sum in the same order on this CPU (tokens never share a reduction outside attention, and attention
    sees every token of its head); GPU kernels that pick tiles by problem size may differ in the last bits."""
    model = str(tiny_models["t2v"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        alone = VideoPipeline.load(Settings(model=model), resolve_model(model)).generate(REQUEST)
    finally:
        torch.set_num_threads(threads)
    settings = Settings(model=model, parallel="cfg=2,sp=2", log_level="WARNING")
    frames = parallel_group.generate(settings, REQUEST, tmp_path / "frames.npy", free_port())
    assert frames.shape == alone.shape and np.array_equal(frames, alone)


def _ranks(pid: int) -> list[int]:
    """The supervisor's rank processes, in start order (multiprocessing's resource tracker is a child too)."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return sorted(c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


@pytest.mark.slow
def test_a_killed_rank_requeues_its_job_and_the_group_restarts(
    redis_server, s3_server, s3_settings, tiny_models, tmp_path
):
    url = redis_server.url.replace("/0", "/3")  # a database of its own: no other worker takes these jobs
    r = redis.Redis.from_url(url)
    r.flushdb()
    store = JobStore(r, Settings(redis_url=url, heartbeat_s=0.5, parallel="cfg=2"))
    # One bucket instead of six: each start of the group warms every bucket, and this test starts two.
    model = tmp_path / "t2v"
    shutil.copytree(tiny_models["t2v"], model)
    one = {"sizes": ["96x64"], "seconds": {"2": 49}, "default_seconds": "2"}
    (model / SPEC_FILE).write_text(json.dumps(json.loads((model / SPEC_FILE).read_text()) | one))
    spec = resolve_model(str(model))
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        **s3_server.env,
        "K5_MODEL": str(model),
        "K5_REDIS_URL": url,
        "K5_STORAGE_URL": s3_settings.storage_url,
        "K5_S3_ENDPOINT_URL": s3_server.endpoint,
        "K5_HEARTBEAT_S": "0.5",
        "K5_PARALLEL": "cfg=2",
        "K5_CHECKPOINT_EVERY_STEPS": "2",  # the killed run has saved its state: the next group resumes it
        "K5_METRICS_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker"],
        env=env,
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: store.workers_online(spec.id), 180, "parallel worker online", log)
        assert "cfg=2" in store.model_layouts().get(spec.id, [])
        job = new_job(store, spec, steps=50, seconds="2")
        wait_until(lambda: store.get(job.id).progress > 10, 60, "job running on the group", log)
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)  # a follower dies inside a step
        wait_until(lambda: "the group restarts" in log.read_text(), 60, "the supervisor restarting the group", log)
        wait_until(lambda: Lifecycle(store).attempts(job.id) >= 1, 60, "the job requeued through its lease", log)
        done = wait_until(
            lambda: (rec := store.get(job.id)).status in ("completed", "failed") and rec, 240, "job ended", log
        )
        assert done.status == "completed", done
        assert proc.poll() is None and not set(ranks) & set(_ranks(proc.pid))
        # The restarted group went on from the killed run's checkpoint, every rank from the same state.
        assert done.resumed_from_step is not None and done.resumed_from_step >= 2, done

        # Cancellation stops every rank at the same step: the group serves the next job.
        cancelled = new_job(store, spec, steps=50, seconds="2")
        wait_until(lambda: store.get(cancelled.id).progress > 10, 60, "second job running", log)
        Lifecycle(store).cancel(cancelled.id)
        wait_until(lambda: "job cancelled while running" in log.read_text(), 60, "the run stopping", log)
        # The same request run without interruption makes the same MP4 as the resumed one, byte for byte.
        again = plan_job(
            VideoCreate(prompt="a lighthouse", num_inference_steps=50, seconds="2", seed=done.seed), spec, False
        )
        Lifecycle(store).create(again)
        wait_until(lambda: store.get(again.id).status == "completed", 120, "a job after the cancel", log)
        storage = open_storage(s3_settings)
        video = [storage.get_bytes(asset_key(store.get(v).asset_prefix, "video.mp4")) for v in (job.id, again.id)]
        assert video[0] == video[1], "the resumed run's video differs from an uninterrupted run's"
        # SIGTERM reaches rank 0, which stops as a one-GPU worker does; the supervisor exits 0 with its ranks.
        restarted = _ranks(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in restarted)
    finally:
        stop_process(proc)
        r.flushdb()

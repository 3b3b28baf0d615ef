"""bench/gateway.py keeps running: its smoke mode starts k5serve and the bare baseline on a real redis-server, drives
them with wrk, and produces every table with real figures. No speed is asserted: that is the bench's output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from bench import load
from tests.conftest import ROOT


@pytest.mark.skipif(shutil.which("wrk") is None, reason=load.INSTALL)
def test_gateway_bench_smoke(tmp_path):
    out = tmp_path / "gateway.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.gateway", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["endpoint"] for r in data["main"]] == [
        "POST /v1/videos",
        "GET /v1/videos/{id}",
        "GET /v1/videos?limit=100",
        "GET /v1/models",
    ]
    for row in data["main"] + data["scale"]:
        assert row["errors"] == 0, row
        assert row["k5serve_rps"] > 0 and row["baseline_rps"] > 0 and row["ratio"] > 0
        assert (
            row["k5serve_seq"] >= 1 and row["baseline_seq"] >= 0
        )  # every k5serve request at least counts against its rate limit
    (row,) = data["processes"]
    assert all(row[f"{name}_rps"] > 0 for name in ("one", "two", "legacy"))
    for title in ("Concurrency 1", "Scaling", "Gateway processes"):
        assert title in done.stdout


def test_wrk_output_is_read():
    out = """Running 1s test @ http://127.0.0.1:1/v1/models
  1 threads and 1 connections
  Latency Distribution
     50%  810.00us
     75%    1.02ms
     90%    1.31ms
     99%    2.50s
  1201 requests in 1.00s, 2.17MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   1199.01
"""
    got = load.parse(out)
    assert (got.requests, got.rps, got.p50_ms, got.p99_ms, got.errors) == (1201, 1199.01, 0.81, 2500.0, 7)


def test_janitor_bench_runs(tmp_path):
    """bench/janitor.py seeds past jobs on a real redis-server and times the cleanup pass; a pass after the
    first has nothing of RQ's failed registry left to look at."""
    out = tmp_path / "janitor.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.janitor", "--past", "200", "--runs", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["past"] == 200 and row["failed"] == 20 and row["failed_left"] == 0
    assert row["steady_cmds"] < row["first_cmds"]
    assert "later passes ms" in done.stdout

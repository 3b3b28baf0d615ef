"""bench/gateway_input.py keeps running: a small run against this tree prints its tables, and the caps hold."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_gateway_input_bench_runs_and_the_caps_hold():
    done = subprocess.run(
        [sys.executable, "-m", "bench.gateway_input", "--json-mb", "40", "--multipart-mb", "40", "--images", "3"]
        + ["--slow", "4", "--slow-wait", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "MB" in line]
    by_case = {row[1]: row for row in rows if len(row) == 8}
    # The bodies were answered 413 at the cap (27 MB), long before their 40 MB were sent.
    for case in ("chunked JSON 40 MB", "chunked multipart 40 MB"):
        assert by_case[case][7].strip(" |") == "1x 413", done.stdout
        assert int(by_case[case][6]) < 40, done.stdout
    assert "slow-client sockets" in done.stdout

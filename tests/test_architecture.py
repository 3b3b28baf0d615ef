"""The import direction is the architecture: the gateway never loads torch/diffusers/worker code, and the
worker never loads FastAPI."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_gateway_does_not_import_torch_or_worker():
    mods = loaded_after("from service.app import create_app; from service.cli import main")
    assert not mods & {"torch", "diffusers", "transformers", "worker", "av"}


def test_worker_does_not_import_fastapi():
    mods = loaded_after("import worker.main, worker.runner, worker.pipeline, worker.encode")
    assert "fastapi" not in mods and "starlette" not in mods

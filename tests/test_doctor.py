"""`k5serve doctor` through the real CLI on this CPU: what it runs, what it skips and why, and the exit status."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from service import cli
from service.contract.models import CATALOGUE


def doctor(monkeypatch, model: str, *args: str) -> tuple[int, dict[str, list[str]]]:
    monkeypatch.setenv("K5_MODEL", model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli.main, ["doctor", *args])
    rows = {}
    for line in result.output.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return result.exit_code, rows


def test_on_cpu_it_runs_what_applies_and_says_what_it_skipped(monkeypatch, tiny_models):
    code, rows = doctor(monkeypatch, str(tiny_models["t2v"]))
    assert code == 0
    for check in ("Triton compiles a kernel", "compiled flex + block mask (NABLA)"):
        assert rows[check][:2] == ["skip", "no CUDA device"]
    assert rows["model files"][0] == "ok" and rows["worker settings"][0] == "ok"
    assert rows["memory budget"][0] == "skip" and "--device-memory" in rows["memory budget"][1]


def test_memory_budget_against_a_given_device(monkeypatch, tiny_models):
    code, rows = doctor(monkeypatch, str(tiny_models["t2v"]), "--device-memory", "80")
    assert code == 0 and rows["memory budget"][0] == "ok"
    assert "largest bucket 96x64x49" in rows["memory budget"][1] and "text encoders device" in rows["memory budget"][1]
    code, rows = doctor(monkeypatch, str(tiny_models["t2v"]), "--device-memory", "0.0001")
    assert code == 1 and rows["memory budget"][0] == "FAIL" and rows["memory budget"][2]


def test_missing_files_are_a_blocker_with_the_fix_named(monkeypatch, tiny_models, tmp_path):
    broken = tmp_path / "t2v"
    shutil.copytree(tiny_models["t2v"], broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    code, rows = doctor(monkeypatch, str(broken))
    assert code == 1 and rows["model files"][0] == "FAIL"
    assert "transformer/*.safetensors" in rows["model files"][1] and rows["model files"][2]

    spec = CATALOGUE["kandinsky-5.0-t2v-lite-sft-10s"]
    code, rows = doctor(monkeypatch, spec.id)
    assert code == 1 and "not in the cache" in rows["model files"][1]
    assert f"huggingface-cli download {spec.source}" in rows["model files"][2]


def test_a_dense_checkpoint_under_a_nabla_entry_fails(monkeypatch, tiny_models, tmp_path):
    ckpt = tmp_path / "t2v"
    shutil.copytree(tiny_models["t2v"], ckpt)
    # NABLA sizes are multiples of 128 (the spec's own rule), so the entry stays valid and only the config differs.
    spec = json.loads((ckpt / "k5serve.json").read_text()) | {"attention": "nabla", "sizes": ["128x128"]}
    (ckpt / "k5serve.json").write_text(json.dumps(spec))
    code, rows = doctor(monkeypatch, str(ckpt))
    assert code == 1 and rows["worker settings"][0] == "FAIL"

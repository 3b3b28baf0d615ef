"""The import direction is the architecture: the gateway never loads torch/diffusers/worker code, and the
worker never loads FastAPI. Checked twice: on what a process really loads, and on the source, where every import
counts, also one inside a function (a lazy import runs only on some paths, so loading alone would miss it).

service/ is four packages and one module: contract/ (the job contract both sides share), gateway/ (HTTP),
delivery/ (the webhook deliverer), console/ (the client commands and the local stack), and cli.py, the command
line that composes them. The contract imports none of the others; the worker imports only the contract."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = {"torch", "diffusers", "transformers", "accelerate", "av", "worker"}
HTTP = {"fastapi", "starlette", "uvicorn"}
# The one module of service/ that may import the worker: the command line, whose `worker` command starts one
# (and whose `tiny-model` command builds the tiny checkpoints).
COMPOSITION_ROOT = "service.cli"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in the file names, top level or nested, absolute names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


SOURCES = {module_name(p): imports_of(p) for d in ("service", "worker") for p in (ROOT / d).rglob("*.py")}


def top(name: str) -> str:
    return name.split(".")[0]


def reachable(start: str) -> set[str]:
    """The k5serve modules that `start` imports, directly or through others (by source)."""
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod in seen or mod not in SOURCES:
            continue
        seen.add(mod)
        todo += [n for n in SOURCES[mod] if n in SOURCES]
    return seen


def test_service_imports_no_gpu_code_but_in_its_composition_root():
    offenders = {
        mod: sorted(n for n in names if top(n) in GPU)
        for mod, names in SOURCES.items()
        if top(mod) == "service" and mod != COMPOSITION_ROOT
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_gateway_reaches_no_gpu_code():
    # The gateway's own modules must not lead to the worker through the composition root either.
    for entry in ("service.gateway.app", "service.delivery.deliverer"):
        assert COMPOSITION_ROOT not in reachable(entry)
        assert not {m for m in reachable(entry) if top(m) == "worker"}


def test_the_worker_reaches_no_http_framework():
    modules = set().union(*(reachable(m) for m in SOURCES if top(m) == "worker"))
    offenders = {m: sorted(n for n in SOURCES[m] if top(n) in HTTP) for m in modules}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_contract_imports_no_other_part_of_service():
    others = ("service.gateway", "service.delivery", "service.console", COMPOSITION_ROOT)
    offenders = {
        mod: sorted(n for n in names if n.startswith(others))
        for mod, names in SOURCES.items()
        if mod.startswith("service.contract")
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_each_package_of_service_imports_only_itself_and_the_contract():
    offenders = {}
    for pkg in ("service.gateway", "service.delivery", "service.console"):
        for mod, names in SOURCES.items():
            if mod.startswith(pkg):
                bad = [n for n in names if top(n) == "service" and not n.startswith((pkg, "service.contract"))]
                if bad:
                    offenders[mod] = sorted(bad)
    assert offenders == {}


def test_the_worker_imports_only_the_contract_of_service():
    offenders = {
        mod: sorted(n for n in names if top(n) == "service" and not n.startswith("service.contract"))
        for mod, names in SOURCES.items()
        if top(mod) == "worker"
    }
    assert {m: n for m, n in offenders.items() if n} == {}


def test_the_layout_has_no_loose_modules():
    loose = sorted(p.name for p in (ROOT / "service").glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert loose == []


def test_the_rules_catch_a_lazy_import(tmp_path):
    """The source check sees an import inside a function: the check above could fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def later():\n    import torch\n    from fastapi import FastAPI\n")
    assert {"torch", "fastapi", "fastapi.FastAPI"} <= imports_of(probe)


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def test_gateway_does_not_import_torch_or_worker():
    mods = loaded_after("from service.gateway.app import create_app; from service.cli import main")
    assert not mods & GPU


def test_worker_does_not_import_fastapi():
    mods = loaded_after("import worker.main, worker.runner, worker.pipeline, worker.encode")
    assert not mods & HTTP


def test_redis_keys_are_named_in_one_module():
    """service/contract/keys.py names every key family: no other module spells one."""
    allowed = {ROOT / "service" / "contract" / "keys.py"}
    inline = [
        str(p.relative_to(ROOT))
        for d in ("service", "worker")
        for p in (ROOT / d).rglob("*.py")
        if p not in allowed and ('"k5:' in p.read_text() or 'f"k5:' in p.read_text())
    ]
    assert inline == []

"""The build stays warning-free (the license table form of pyproject.toml
stops building on 2027-02-18), and every multi-process teardown waits on a barrier."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_license_is_an_spdx_expression() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert all((ROOT / f).is_file() for f in project["license-files"])


@pytest.mark.timeout(240)
def test_wheel_builds_without_any_warning(tmp_path) -> None:
    pytest.importorskip("setuptools")
    # a copy, so the build leaves nothing behind in the checkout
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (tmp_path / "out").mkdir()
    code = ("import setuptools.build_meta as b; "
            "print(b.build_wheel('out'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # -W error: any warnings.warn (setuptools' deprecations among them) fails the build
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=200)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert proc.stdout.strip().splitlines()[-1].endswith(".whl")
    noisy = [line for line in output.splitlines()
             if re.search(r"warning|deprecat", line, re.I)]
    assert noisy == [], "\n".join(noisy)


def _teardowns() -> list[tuple[Path, int, list[str]]]:
    """Every destroy_process_group() call in code, docs and examples, with the
    lines before it."""
    out = []
    files = [p for d in ("src", "tests", "examples", "bench", "docs")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md")]
    for path in [*files, ROOT / "README.md"]:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "destroy_process_group()" in line and not line.lstrip().startswith("#") \
                    and "`" not in line and path.name != Path(__file__).name:
                out.append((path, i + 1, lines[max(0, i - 3):i]))
    return out


def test_every_process_group_teardown_waits_on_a_barrier() -> None:
    # gloo aborts at exit ("terminate called without an active exception") in about
    # 1 run of 6 when a rank destroys the group while another still talks to it
    found = _teardowns()
    assert len(found) >= 6
    missing = [f"{p.relative_to(ROOT)}:{n}" for p, n, before in found
               if not any("barrier()" in b for b in before)]
    assert missing == []


def test_no_test_retries_a_gloo_abort() -> None:
    for path in (ROOT / "tests").glob("test_*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name == Path(__file__).name:
            continue
        assert "terminate called without an active exception" not in text, path.name


def test_no_import_circle_inside_the_package() -> None:
    """Every ``from .x import`` / ``from ..x import`` edge (TYPE_CHECKING and function-level
    imports included) between torchfreeze's own modules: the graph has no cycle."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "torchfreeze"
    mods: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            found = [n for n in names if n in mods] or ([target] if target in mods else [])
            edges[mod].update(t for t in found if t != mod)
    # a package's __init__ re-exporting its submodules is not a circle by itself:
    # drop edges from a package to its own children
    for mod in edges:
        edges[mod] = {t for t in edges[mod] if not t.startswith(mod + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return [*stack[stack.index(t):], t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_import_torchfreeze_loads_no_optional_integration() -> None:
    """Neither ``torchfreeze`` nor ``torchfreeze.integrations`` imports a trainer
    library, peft or matplotlib (each integration imports its own, lazily)."""
    import subprocess
    import sys

    code = ("import sys, torchfreeze, torchfreeze.integrations; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', "
            "'accelerate', 'peft', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_submodule_shadows_a_public_name() -> None:
    """``torchfreeze.<name>`` is the documented object for every public name: no module
    of a package is called like a name the package exports (importing that module
    would rebind the package attribute to the module), at any level."""
    import importlib
    import inspect
    import pkgutil

    import torchfreeze

    for pkg_name in ("torchfreeze", "torchfreeze.cache", "torchfreeze.integrations"):
        pkg = importlib.import_module(pkg_name)
        submodules = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
        clash = submodules & set(pkg.__all__)
        assert clash == set(), f"{pkg_name}: modules named like exported names: {clash}"
    for name in torchfreeze.__all__:
        obj = getattr(torchfreeze, name)
        assert not inspect.ismodule(obj), f"torchfreeze.{name} is a module"
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__name__ == name, f"torchfreeze.{name} is {obj.__name__}: an alias"
            owner = importlib.import_module(obj.__module__)
            assert getattr(owner, name) is obj
    # the six functions whose modules used to carry their names
    for name in ("freeze", "select", "check", "verify", "summary", "layers"):
        assert inspect.isfunction(getattr(torchfreeze, name)), name


def test_init_docstring_tells_the_truth() -> None:
    """What ``torchfreeze/__init__.py``'s docstring says about imports holds: the core
    (torch, rich) comes with the package, the integrations, ``torchfreeze.distributed``
    and the demos only when imported, and the package namespace is public API."""
    import importlib.util
    import inspect

    import torchfreeze

    doc = torchfreeze.__doc__ or ""
    named = set(re.findall(r"``(torchfreeze(?:\.\w+)+)``", doc))
    assert {"torchfreeze.integrations.lightning", "torchfreeze.integrations.transformers"} \
        <= named
    for module in named:
        assert importlib.util.find_spec(module) is not None, f"the docstring names {module}"
    lazy = sorted([*named, "torchfreeze.integrations", "torchfreeze.distributed",
                   "torchfreeze.demo", "torchfreeze.demo_news", "torchfreeze.demo_llm",
                   "lightning", "transformers"])
    code = ("import sys, json, torchfreeze; "
            f"print(json.dumps([sorted(m for m in {lazy!r} if m in sys.modules), "
            "[m in sys.modules for m in ('torch', 'rich')]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    loaded, core = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [] and core == [True, True], out.stdout
    # first use imports the lazy submodules
    assert inspect.ismodule(torchfreeze.distributed)
    # the namespace: the names in __all__, submodules, and the import machinery
    extra = {n for n, v in vars(torchfreeze).items()
             if not n.startswith("_") and not inspect.ismodule(v)} - set(torchfreeze.__all__)
    assert extra <= {"annotations", "Any"}, extra

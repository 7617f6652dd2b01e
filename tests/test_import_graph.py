"""No import cycles inside raydetect.

The graph is built with the standard library only (``ast`` over ``raydetect/**/*.py``) and
holds every ``import raydetect…`` / ``from raydetect… import …`` / relative import, at module
level and inside functions (a lazy import still makes the two modules depend on each other).
A second test imports every module in a fresh interpreter, in two different orders.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "raydetect"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, or its longest prefix that is a module
    (``raydetect.config.ConfigError`` → ``raydetect.config``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """raydetect modules ``mod`` imports anywhere in its source (any nesting level)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "raydetect":
                    target = _resolve(a.name, modules)
                    if target:
                        out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "raydetect":
                continue
            # ``from raydetect.job import output as shards`` imports the submodule raydetect.job.output
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in modules:
                    out.add(sub)
                else:
                    target = _resolve(source, modules)
                    if target:
                        out.add(target)
    # importing a submodule runs its parent packages' __init__ first: that is an edge too,
    # except a package's own submodules importing their package (Python handles that order)
    parents = set()
    for t in out:
        parts = t.split(".")
        for i in range(1, len(parts)):
            p = ".".join(parts[:i])
            if p in modules and not mod.startswith(p + ".") and p != mod:
                parents.add(p)
    out |= parents
    out.discard(mod)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS, three colours)."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for root in sorted(graph):
        if colour[root] != white:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = grey
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = black
                stack.pop()
                path.pop()
            elif colour.get(nxt, black) == grey:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == white:
                colour[nxt] = grey
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


def test_find_cycle_detects_cycles():
    """The checker itself: a planted cycle, lazy or not, is found; a DAG passes."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    modules = {"raydetect": Path("x"), "raydetect.a": Path("a"), "raydetect.b": Path("b")}
    lazy = "def f():\n    from raydetect.b import thing\n"
    tmp = REPO / ".pytest_import_graph_probe.py"
    try:
        tmp.write_text(lazy)
        assert imports_of("raydetect.a", tmp, modules) == {"raydetect.b"}
        tmp.write_text("from raydetect import b\nfrom . import b as c\n")
        assert imports_of("raydetect.a", tmp, modules) == {"raydetect.b"}
    finally:
        tmp.unlink(missing_ok=True)


def test_graph_sees_the_known_edges():
    """Guards the parser against silently finding nothing."""
    g = import_graph()
    assert "raydetect.config" in g["raydetect.detector"]
    assert "raydetect.types" in g["raydetect.stages.postprocess"]
    assert "raydetect.detector" in g["raydetect.serve.app"]  # module level
    assert "raydetect.job.run" in g["raydetect.cli.detect"]  # function level
    assert "raydetect.job.output" in g["raydetect.job.run"]  # from raydetect.job import output as shards
    assert len(g) >= 30


def test_no_domain_module_imports_the_cli():
    """The command line is the top floor: domain modules take config objects, never argparse."""
    g = import_graph()
    offenders = {m: sorted(t for t in deps if t.startswith("raydetect.cli"))
                 for m, deps in g.items() if not m.startswith("raydetect.cli")}
    assert not {m: d for m, d in offenders.items() if d}
    argparse_users = [m for m, p in all_modules().items()
                      if not m.startswith("raydetect.cli") and "import argparse" in p.read_text()]
    assert argparse_users == []


def test_serve_builder_path_still_resolves():
    """``serve run raydetect.serve:app_builder`` (and Serve config files) import the package and
    read the builder from it: a typed builder whose argument Serve validates into ServeConfig."""
    from ray.serve._private.utils import import_attr

    from raydetect.config import ServeConfig

    builder = import_attr("raydetect.serve:app_builder")
    import inspect

    (param,) = inspect.signature(builder).parameters.values()
    assert param.annotation is ServeConfig


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _import_all(order: list[str]) -> subprocess.CompletedProcess:
    code = (
        "import importlib, sys\n"
        f"for m in {order!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if (e.name or '').split('.')[0] == 'raydetect':\n"
        "            raise\n"
        "        print('optional dependency missing for', m, ':', e.name)\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(m for m in all_modules() if not m.endswith(".__main__"))  # __main__ runs the CLI
    if order == "reversed":
        names = names[::-1]
    r = _import_all(names)
    assert r.returncode == 0, r.stderr[-4000:]


def test_package_exports_are_light_and_complete():
    """``import raydetect`` pulls in neither Ray nor torch nor ONNX Runtime; every name in
    ``__all__`` resolves (Detector, run_job and app_builder on first use)."""
    code = ("import sys, raydetect; heavy = [m for m in ('ray', 'torch', 'onnxruntime') if m in sys.modules]; "
            "assert not heavy, heavy; print(sorted(n for n in raydetect.__all__ if getattr(raydetect, n) is None))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    import raydetect

    assert {"Detector", "run_job", "app_builder", "DetectorConfig", "JobConfig", "ServeConfig"} <= set(raydetect.__all__)
    with pytest.raises(AttributeError):
        raydetect.no_such_name  # noqa: B018

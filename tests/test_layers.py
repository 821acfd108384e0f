"""The house rules, checked by tools: import-linter's layer contracts (pyproject.toml), no import cycles between
modules or packages (grimp, the graph import-linter builds), and no source file over 500 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fuselm"


def test_import_linter_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's components with more than one member (a cycle), iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack, stack, out = set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph.get(nxt, ()))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(component)
    return out


def _graph() -> dict[str, set[str]]:
    g = grimp.build_graph("fuselm")
    return {m: {i for i in g.find_modules_directly_imported_by(m)} for m in g.modules}


def test_no_module_cycles():
    cycles = _strongly_connected(_graph())
    assert cycles == [], f"module import cycles: {cycles}"


def test_no_package_cycles():
    def package(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, imports in _graph().items():
        packages.setdefault(package(module), set()).update(package(i) for i in imports if package(i) != package(module))
    cycles = _strongly_connected(packages)
    assert cycles == [], f"package import cycles: {cycles}"


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert long == {}, f"files over 500 lines: {long}"

"""The layering of docs/architecture.md, checked on the imports themselves (ast, no import
runs): router -> service -> repository -> models, with push and realtime beside them.

Every import counts, also one inside a function or under TYPE_CHECKING: a deferred import
is still a dependency a reader has to follow."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pns_server"
DOMAINS = ("admin", "approvals", "clients", "devices", "otp", "pairings")
# Inside a domain package: what may be imported by what. A module may import its own rank
# or a lower one (a service may use another domain's service), never a higher one.
RANK = {"schemas": 0, "repository": 1, "service": 2, "router": 3}
# Any other module of a domain (approvals/creation.py, otp/throttle.py...) holds rules split
# out of its service by concern: it ranks as a service.
SERVICE_RANK = RANK["service"]
# Beside the domains: they serve every domain and know none of them.
BESIDE = ("push", "realtime")
# The foundation every layer stands on: no domain, no HTTP, no start-up code above it.
FOUNDATION = (
    "audit",
    "config",
    "db",
    "driver",
    "errors",
    "metrics",
    "models",
    "rows",
    "security",
    "states",
    "topics",
    "totp",
)
# Where the process is put together: only these may import everything.
TOP = ("app", "cli", "deps", "entry", "runtime", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path) -> Iterator[str]:
    """The pns_server modules `name` imports (`from pkg import mod` names the module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                yield target


GRAPH = {name: set(imported(name, path)) for name, path in MODULES.items()}


def place(name: str) -> tuple[str, str]:
    """(area, kind): ('approvals', 'service'), ('push', 'apns'), ('models', '')..."""
    parts = name.split(".")[1:]
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""


def edges() -> Iterator[tuple[str, str]]:
    for name, targets in GRAPH.items():
        for target in sorted(targets):
            yield name, target


def test_the_graph_is_read() -> None:
    # A parser that found nothing would let every rule below pass.
    assert "pns_server.approvals.repository" in GRAPH["pns_server.approvals.service"]
    assert "pns_server.approvals.outcomes" in GRAPH["pns_server.approvals.creation"]
    assert len(MODULES) > 50


def test_inside_a_domain_imports_point_down() -> None:
    wrong = []
    for name, target in edges():
        (area, kind), (to_area, to_kind) = place(name), place(target)
        inside = area in DOMAINS and to_area in DOMAINS and kind and to_kind
        if inside and RANK.get(to_kind, SERVICE_RANK) > RANK.get(kind, SERVICE_RANK):
            wrong.append(f"{name} -> {target}")
    assert wrong == []


@pytest.mark.parametrize("lower", [*BESIDE, *FOUNDATION])
def test_push_realtime_and_the_foundation_know_no_domain_and_no_start_up(lower: str) -> None:
    wrong = []
    for name, target in edges():
        to_area = place(target)[0]
        if place(name)[0] == lower and (to_area in DOMAINS or to_area in TOP):
            wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_the_foundation_stands_below_push_and_realtime() -> None:
    wrong = [
        f"{name} -> {target}"
        for name, target in edges()
        if place(name)[0] in FOUNDATION and place(target)[0] in BESIDE
    ]
    assert wrong == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative enough for
    a graph this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_cycle() -> None:
    # A package's __init__ re-exports its modules; an edge into it is an edge to them.
    assert cycles(GRAPH) == []


def test_no_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for name, target in edges():
        area, to_area = place(name)[0], place(target)[0]
        if area != to_area:
            packages.setdefault(area, set()).add(to_area)
    assert cycles(packages) == []

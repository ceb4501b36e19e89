"""The house's shape, measured from the source alone (nothing imported or run): modules, import
cycles, cross-module imports of private names, long functions and files.

    python benchmarks/structure.py [PACKAGE_DIR]     # default: dqnc/ of this checkout

Issue 22's before/after table comes from this script run on two checkouts.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LONG_FUNCTION = 80  # lines
LONG_FILE = 500


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Module -> dqnc modules it imports (anywhere in the file), and (importer, module, name) of private names."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    target = full if full in mods else base
                    if target in mods and target != m:
                        graph[m].add(target)
                    if a.name.startswith("_") and not a.name.startswith("__") and target in mods and target != m:
                        private.append((m, base, a.name))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.name != m:
                        graph[m].add(a.name)
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def long_functions(mods: dict[str, Path], limit: int = LONG_FUNCTION) -> list[tuple[str, str, int]]:
    out = []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append((m, node.name, n))
    return sorted(out, key=lambda t: -t[2])


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "dqnc"
    mods = modules(root)
    graph, private = imports(mods)
    lines = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in mods.items()}
    cli = sum(n for m, n in lines.items() if m == "dqnc.cli" or m.startswith("dqnc.cli."))
    longf = long_functions(mods)
    print(f"modules: {len(mods)}; lines: {sum(lines.values()):,}")
    print(f"import cycles: {len(cycles(graph))} {cycles(graph)}")
    print(f"cross-module imports of private names: {len(private)}")
    print(f"functions over {LONG_FUNCTION} lines: {len(longf)} " + ", ".join(f"{m}.{f} {n}" for m, f, n in longf))
    big = sorted(((n, m) for m, n in lines.items() if n > LONG_FILE), reverse=True)
    print(f"files over {LONG_FILE} lines: {len(big)} " + ", ".join(f"{m} {n}" for n, m in big))
    print(f"cli lines: {cli:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The layout rules of shared/DESIGN.md section 1, read from the source: data flows one way (layers know no
models; models know no training, evaluation or data), nothing in the library imports the CLI, bench/ uses no
private function, and there is no import cycle, not even through imports inside functions."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llamavit"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (ROOT / Path(*name.split(".")) / "__init__.py").is_file()


def exists(name: str) -> bool:
    return is_package(name) or (ROOT / Path(*name.split("."))).with_suffix(".py").is_file()


def imports_of(path: Path):
    """(imported llamavit module, line) for every import in the file, at any depth (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub
            targets = [f"{base}.{a.name}" if exists(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "llamavit":
                yield target, node.lineno


def graph():
    """{module: {imported module: line}}, with the parent packages a module import runs (their __init__),
    except the module's own ancestors (a package importing its submodules is not a cycle)."""
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        own = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 2)}
        out = edges.setdefault(source, {})
        for target, line in imports_of(path):
            parts = target.split(".")
            for i in range(2, len(parts) + 1):   # importing a.b.c runs a.b's __init__ first
                step = ".".join(parts[:i])
                if step not in own and exists(step):
                    out.setdefault(step, line)
    return edges


EDGES = graph()


def offenders(source_prefix: str, forbidden: tuple):
    return sorted(f"{src} -> {dst} (line {line})" for src, dsts in EDGES.items() if src.startswith(source_prefix)
                  for dst, line in dsts.items() if dst.startswith(forbidden))


@pytest.mark.parametrize("source,forbidden", [
    ("llamavit.layers", ("llamavit.models", "llamavit.train", "llamavit.eval", "llamavit.data",
                         "llamavit.objectives", "llamavit.cli")),
    ("llamavit.models", ("llamavit.train", "llamavit.eval", "llamavit.data", "llamavit.objectives", "llamavit.cli")),
    ("llamavit.objectives", ("llamavit.train", "llamavit.eval", "llamavit.data", "llamavit.cli")),
    ("llamavit.dense", ("llamavit.train", "llamavit.eval", "llamavit.data", "llamavit.objectives", "llamavit.cli")),
])
def test_data_flows_one_way(source, forbidden):
    assert not offenders(source, forbidden)


def test_nothing_in_the_library_imports_the_cli():
    library = {m: d for m, d in EDGES.items() if not m.startswith("llamavit.cli")}
    bad = [f"{m} -> {d}" for m, dsts in library.items() for d in dsts if d.startswith("llamavit.cli")]
    assert not bad


def test_no_import_cycles():
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in EDGES.get(node, {}):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in EDGES:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions_and_cycles():
    # the rules above are only as good as the graph: function-level imports and a known cycle-free chain
    assert "llamavit.eval.fid" in EDGES["llamavit.cli_generate"]            # imported inside cmd_generate
    assert "llamavit.models.convert" in EDGES["llamavit.models.registry"]
    assert "llamavit.models.registry" not in EDGES["llamavit.models.convert"]


def test_bench_uses_no_private_library_function():
    bad = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llamavit"):
                bad += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llamavit.cli"):
                bad.append(f"{path.name}: imports the CLI module {node.module}")
    assert not bad

"""The package's shape, read from its source: no import cycles, Hugging Face code only where it
belongs, no private names across modules, small files. Imports inside functions count as edges
too: a cycle held together by a lazy import is still a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# where `transformers` may be imported at module level (vocabfiles imports it lazily, in functions)
HF_PACKAGES = ("fastfuse.integrations", "fastfuse.demo", "fastfuse.cli")


def module_files() -> dict[str, Path]:
    """fastfuse's modules by dotted name (kernels/ is installed as fastfuse.kernels)."""
    out = {}
    for base, pkg in ((ROOT / "fastfuse", "fastfuse"), (ROOT / "kernels", "fastfuse.kernels")):
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


MODULES = module_files()
COMPILED = {"fastfuse._C"}     # the C++ core: a module without a .py file


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, str | None, str | None, ast.AST]]:
    """(imported module, imported name or None for a module, local alias of a module, node) for every
    import statement, at any depth."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.asname, node) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            src = resolve(module, node)
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in MODULES or sub in COMPILED:
                    out.append((sub, None, a.asname or a.name, node))
                else:
                    out.append((src, a.name, None, node))
    return out


def edges(module: str) -> set[str]:
    return {m for m, _, _, _ in imports(module) if m in MODULES and m != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    assert len(MODULES) > 30
    graph = {m: edges(m) for m in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def module_level_nodes(tree: ast.Module):
    """Statements that run at import: everything but function bodies."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_transformers_only_where_it_belongs(module):
    if module.startswith(HF_PACKAGES):
        return
    tree = ast.parse(MODULES[module].read_text())
    for node in module_level_nodes(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        assert not any(n.split(".")[0] == "transformers" for n in names), \
            f"{module} imports transformers at module level (line {node.lineno})"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module):
    """``from fastfuse.x import _name`` and ``x._name`` on an imported fastfuse module are refused
    (private *modules* such as ``_dispatch`` and the compiled ``_C`` may be imported; ``_C``'s
    testing hooks are for tests only)."""
    aliases = {}
    for src, name, alias, node in imports(module):
        if src == module or not src.startswith("fastfuse"):
            continue
        if name is not None:
            assert not private(name), f"{module}:{node.lineno} imports the private name {name} from {src}"
        elif alias is not None:
            aliases[alias] = src
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert not private(node.attr), \
                f"{module}:{node.lineno} reads the private name {node.attr} of {aliases[node.value.id]}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_small_files(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"


def test_library_modules_do_not_parse_command_lines():
    """argparse and the CLI package belong to fastfuse.cli only (``python -m fastfuse`` runs it)."""
    for module in MODULES:
        if module.startswith("fastfuse.cli") or module == "fastfuse.__main__":
            continue
        for src, _, _, node in imports(module):
            assert src != "argparse" and not src.startswith("fastfuse.cli"), \
                f"{module}:{node.lineno} imports {src}"


def test_compiled_core_stub_matches_the_module():
    """fastfuse/_C.pyi declares exactly what the compiled module exports, with the same parameters."""
    import inspect

    from fastfuse import _C

    stub = ast.parse((ROOT / "fastfuse" / "_C.pyi").read_text())
    declared = {n.name: [a.arg for a in n.args.args] for n in stub.body if isinstance(n, ast.FunctionDef)}
    declared |= {n.target.id: None for n in stub.body if isinstance(n, ast.AnnAssign)}
    exported = {n for n in dir(_C) if not n.startswith("__")}
    assert set(declared) == exported
    for name, params in declared.items():
        if params is None:
            continue
        sig = getattr(_C, name).__doc__.splitlines()[0]              # pybind11: "name(a: T, b: T = 0) -> R"
        got = [p.split(":")[0].strip() for p in sig[sig.index("(") + 1: sig.rindex(")")].split(", ") if p]
        assert got == params, (name, got, params)
        assert inspect.isbuiltin(getattr(_C, name))

"""The package's shape, read from its source: layers whose imports point down, no import cycles,
Hugging Face code only where it belongs, no private names across modules, small files. Imports
inside functions count as edges too: a cycle held together by a lazy import is still a cycle."""
from __future__ import annotations

import ast
import subprocess
import sys
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
# The layers, bottom first (docs/DESIGN.md "Layers"): a module imports only its own layer or a lower one.
LAYERS = (
    ("fastfuse", "fastfuse._C", "fastfuse.extras", "fastfuse.storage", "fastfuse.corpus", "fastfuse.batch",
     "fastfuse.tokenizer_files", "fastfuse.kernels"),
    ("fastfuse.align",),
    ("fastfuse.teachers",),
    ("fastfuse.batches",),
    ("fastfuse.loss",),
    ("fastfuse.testing",),
    ("fastfuse.integrations",),
    ("fastfuse.demo",),
    ("fastfuse.cli", "fastfuse.__main__"),
)
MAX_TOP_LEVEL = 12


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


def layer_of(module: str) -> int:
    """The layer of ``module``: the one whose longest prefix matches it."""
    best = (-1, -1)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[1]:
                best = (i, len(p))
    assert best[0] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def test_imports_point_down():
    up = [f"{m} (layer {layer_of(m)}) imports {e} (layer {layer_of(e)})"
          for m in sorted(MODULES) for e in sorted(edges(m)) if layer_of(e) > layer_of(m)]
    assert not up, "\n".join(up)


def test_layer_finder():
    assert layer_of("fastfuse.loss.parallel.stages") == layer_of("fastfuse.loss") > layer_of("fastfuse.batches")
    assert layer_of("fastfuse.batch") == 0 < layer_of("fastfuse.batches.dataset")


def test_top_level_is_small():
    top = [m for m in MODULES if m.count(".") == 1 and not is_package(m)]
    assert len(top) <= MAX_TOP_LEVEL, sorted(top)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("fastfuse.align")))
def test_alignment_is_torch_free(module):
    line = module_level_import(module, "torch")
    assert line is None, f"{module} imports torch at module level (line {line})"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("fastfuse.kernels")))
def test_kernels_import_only_triton_torch_and_themselves(module):
    allowed = ("triton", "torch", "math", "fastfuse.kernels", "__future__", "typing", "contextlib",
               "contextvars", "functools", "json", "os")
    for src, _, _, node in imports(module):
        assert src == module or src.startswith(allowed), f"{module}:{node.lineno} imports {src}"


BATCH_WITHOUT_LOSS = """
import sys
import numpy as np
from fastfuse import FusionCollator
rng = np.random.default_rng(0)
maps = [rng.integers(-1, 20, n).astype(np.int32) for n in (30, 40)]
ex = {"input_ids": rng.integers(0, 20, 6), "ce": np.ones(2, np.float32),
      "topk_ids": [rng.integers(0, n, (5, 3)).astype(np.int32) for n in (30, 40)],
      "topk_logprobs": [np.full((5, 3), -1.5, np.float16) for _ in range(2)],
      "pos": [rng.integers(-1, 5, 6).astype(np.int32) for _ in range(2)]}
batch = FusionCollator(maps, 0, pin_memory=False)([ex, ex])
assert batch["source_topk"].ids.shape[:2] == (2, 2), batch["source_topk"].ids.shape
print(sorted(m for m in sys.modules if m.startswith("fastfuse.")))
"""


def test_building_a_batch_loads_no_loss_module():
    out = subprocess.run([sys.executable, "-c", BATCH_WITHOUT_LOSS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.strip()
    assert "fastfuse.batches.dataset" in loaded and "fastfuse.loss" not in loaded, loaded


def test_no_import_cycle():
    assert len(MODULES) > 30
    graph = {m: edges(m) for m in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def module_level_import(module: str, package: str) -> int | None:
    """The line of ``module``'s first import of ``package`` (or a submodule) that runs at import time."""
    for node in module_level_nodes(ast.parse(MODULES[module].read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n.split(".")[0] == package for n in names):
            return node.lineno
    return None


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
    line = module_level_import(module, "transformers")
    assert line is None, f"{module} imports transformers at module level (line {line})"


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


CPP_FILES = sorted(p for ext in ("cpp", "h", "hpp") for p in (ROOT / "csrc").glob(f"*.{ext}"))


@pytest.mark.parametrize("path", [MODULES[m] for m in sorted(MODULES)] + CPP_FILES,
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_small_files(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (at most {MAX_LINES})"


def test_small_files_sees_the_cpp_core():
    assert {"module.cpp", "bind_spans.cpp", "spans.cpp", "dtw.cpp"} <= {p.name for p in CPP_FILES}


def test_library_modules_do_not_parse_command_lines():
    """argparse and the CLI package belong to fastfuse.cli only (``python -m fastfuse`` runs it)."""
    for module in MODULES:
        if module.startswith("fastfuse.cli") or module == "fastfuse.__main__":
            continue
        for src, _, _, node in imports(module):
            assert src != "argparse" and not src.startswith("fastfuse.cli"), \
                f"{module}:{node.lineno} imports {src}"


def stub_names(body: list[ast.stmt]) -> dict[str, list[str] | None]:
    """Names a stub body declares: functions (and static methods) with their parameters, variables as None."""
    declared: dict[str, list[str] | None] = {
        n.name: [a.arg for a in n.args.args] for n in body if isinstance(n, ast.FunctionDef)}
    declared |= {n.target.id: None for n in body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return declared


def check_stub(declared: dict[str, list[str] | None], module) -> None:
    """``declared`` is exactly what the compiled ``module`` exports, functions with the same parameters."""
    import inspect

    exported = {n for n in dir(module) if not n.startswith("__")}
    assert set(declared) == exported, (module.__name__, set(declared) ^ exported)
    for name, params in declared.items():
        if params is None:
            continue
        sig = getattr(module, name).__doc__.splitlines()[0]          # pybind11: "name(a: T, b: T = 0) -> R"
        got = [p.split(":")[0].strip() for p in sig[sig.index("(") + 1: sig.rindex(")")].split(", ") if p]
        assert got == params, (module.__name__, name, got, params)
        assert inspect.isbuiltin(getattr(module, name))


def test_compiled_core_stub_matches_the_module():
    """fastfuse/_C.pyi declares exactly what the compiled module exports, with the same parameters, and its
    ``_testing`` submodule (typed by a stub-only class of static methods) exactly what that exports."""
    import types

    from fastfuse import _C

    stub = ast.parse((ROOT / "fastfuse" / "_C.pyi").read_text())
    check_stub(stub_names(stub.body), _C)
    assert isinstance(_C._testing, types.ModuleType)
    (testing,) = [n.annotation for n in stub.body if isinstance(n, ast.AnnAssign) and n.target.id == "_testing"]
    (cls,) = [n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == ast.unparse(testing)]
    assert all([ast.unparse(d) for d in n.decorator_list] == ["staticmethod"]
               for n in cls.body if isinstance(n, ast.FunctionDef))
    check_stub(stub_names(cls.body), _C._testing)
    assert _C.MAX_THREADS == 1024


def test_loss_options_are_make_specs_parameters():
    import inspect

    from fastfuse.loss.spec import LOSS_OPTIONS, make_spec

    assert LOSS_OPTIONS == tuple(inspect.signature(make_spec).parameters)


# Public module-level functions whose name several modules define on purpose, for the same role:
# each kernel module's own choice of launch (forced, a GPU run's winner, else its table).
SAME_NAME_ALLOWED: dict[str, set[str]] = {
    "launch_config": {"fastfuse.kernels.divergence", "fastfuse.kernels.fused_ce"},
}


def test_no_function_name_defined_in_two_modules():
    """A public function name means one thing: no two modules of fastfuse (kernels included) define a
    module-level ``def`` of it (re-exports, as ``__init__`` modules do, are imports, not defs)."""
    where: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not private(node.name):
                where.setdefault(node.name, set()).add(module)
    twice = {name: sorted(mods) for name, mods in where.items()
             if len(mods) > 1 and mods != SAME_NAME_ALLOWED.get(name)}
    assert not twice, f"function names defined in several modules: {twice}"


def autograd_functions() -> list[str]:
    """``module.Class`` of every class under fastfuse/ deriving from ``torch.autograd.Function``
    (written as ``torch.autograd.Function``, ``autograd.Function`` or an imported ``Function``)."""
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b in ("torch.autograd.Function", "autograd.Function", "Function") for b in bases):
                    out.append(f"{module}.{node.name}")
    return sorted(out)


def test_two_autograd_functions():
    """One autograd Function for the loss from logits, one for the loss from hidden states and the
    lm_head; local and vocabulary-parallel rows are two runners under the same pair."""
    assert len(autograd_functions()) == 2, autograd_functions()


def divergence_lists(source: str, names) -> list[int]:
    """Lines of ``source`` holding a literal tuple, list, set or dict (its keys) of two or more of ``names``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        elts = node.keys if isinstance(node, ast.Dict) else \
            node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
        if sum(isinstance(e, ast.Constant) and e.value in names for e in elts) >= 2:
            found.append(node.lineno)
    return found


def test_divergence_list_finder():
    names = {"kl_a", "kl_b", "kl_c"}
    planted = 'A = ("kl_a", "x")\nB = ["kl_b", 1, "kl_c"]\nC = {"kl_a": 1, "kl_c": 2}\nD = {"kl_a", f(x)}\nE = ("kl_c",)\n'
    assert divergence_lists(planted, names) == [2, 3]
    assert divergence_lists("def f(x=('kl_a', 'kl_b')): return {'kl_c', 'kl_a'}\n", names) == [1, 1]


def test_no_literal_list_of_divergences_outside_the_registry():
    """Every list of divergences reads fastfuse.loss.spec (DIVERGENCES, REGISTRY, lookup)."""
    from fastfuse.loss.spec import DIVERGENCES

    registry = ROOT / "fastfuse" / "loss" / "spec.py"
    files = [f for d in ("fastfuse", "kernels", "tests", "benchmarks") for f in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 100
    bad = [f"{f.relative_to(ROOT)}:{line}" for f in files if f != registry
           for line in divergence_lists(f.read_text(), set(DIVERGENCES))]
    assert not bad, bad

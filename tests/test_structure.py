"""The code keeps the shape a reader can rely on.

- No function in `ssm/`, `kernels/` or `experiments/` is longer than `MAX_LINES` lines, unless the
  comment block right above its `def` (or above its decorators) says why, with `long:` in it
  (e.g. a Triton kernel that splitting would slow down).
- Every module of the `kernels` package imports under its dotted name (`import kernels.<op>.<module>
  as m`): no public name of a package shadows one of its subpackages.
- `ssm.__all__` lists exactly what `ssm` serves: every listed name resolves, and every name that
  the lazy `ssm.__getattr__` serves is listed.
- No import cycle among the modules of `ssm`, `kernels` and `experiments` (module-level imports).
- Each setting is written once: no layer, block or config constructor names a field of a layer
  config class (`ssm.config`) as an explicit parameter (except the positional `d_state`), so
  defaults live in the dataclasses only.
- The S4 layer class does not branch on its `mode` after construction: the parameterization
  module (`ssm.layers.ssm_diag`, `ssm.layers.ssm_dplr`) answers instead.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["ssm", "kernels", "experiments"]
MAX_LINES = 80
MARKER = "long:"


def _comment_block_above(lines: list[str], first: int) -> list[str]:
    """The contiguous `#` comment lines directly above 1-based line `first`."""
    out = []
    i = first - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        out.append(lines[i].strip())
        i -= 1
    return out


def long_functions(path: Path, max_lines: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(name, line of `def`, length in lines) of the functions in `path` longer than `max_lines`
    that carry no `long:` comment; nested functions are measured on their own too."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        if length <= max_lines:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        if any(MARKER in line for line in _comment_block_above(lines, first)):
            continue
        found.append((node.name, node.lineno, length))
    return found


def _python_files():
    for pkg in PACKAGES:
        yield from sorted(p for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def test_long_function_rule_itself(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))  # def line + MAX_LINES = too long
    src = (f"def short():\n    return 1\n\n\ndef too_long():\n{body}\n\n\n"
           f"# {MARKER} a reason\n@staticmethod\ndef allowed():\n{body}\n")
    f = tmp_path / "m.py"
    f.write_text(src)
    assert [name for name, _, _ in long_functions(f)] == ["too_long"]


def test_no_function_longer_than_the_limit():
    problems = [f"{path.relative_to(ROOT)}:{line}: {name} is {n} lines"
                for path in _python_files() for name, line, n in long_functions(path)]
    assert not problems, (f"functions longer than {MAX_LINES} lines (split them by responsibility, or put "
                          f"a '# {MARKER} <reason>' comment right above the def):\n" + "\n".join(problems))


def _kernel_modules() -> list[str]:
    import kernels
    return sorted(m.name for m in pkgutil.walk_packages(kernels.__path__, prefix="kernels."))


@pytest.mark.parametrize("name", _kernel_modules())
def test_kernel_module_imports_under_its_dotted_name(name):
    namespace: dict = {}
    # `import a.b.c as m` reaches the module through attribute look-ups, so a function bound to the
    # name of a subpackage (shadowing it) breaks this even though importlib.import_module works.
    exec(f"import {name} as m", namespace)  # noqa: S102 - the statement under test
    assert namespace["m"] is sys.modules[name]


def _ssm_candidates(ssm) -> set[str]:
    """Names `ssm` might serve: its export table, its submodules, and the public names of the
    modules the export table points to."""
    exports = getattr(ssm, "_EXPORTS", {})
    names = set(exports) | {m.name for m in pkgutil.iter_modules(ssm.__path__)}
    for module in set(exports.values()):
        names |= {n for n in vars(importlib.import_module(module)) if not n.startswith("_")}
    return names


def test_ssm_all_lists_exactly_what_it_serves():
    import ssm
    missing = [n for n in ssm.__all__ if not hasattr(ssm, n)]
    assert not missing, f"names in ssm.__all__ that do not resolve: {missing}"
    assert len(set(ssm.__all__)) == len(ssm.__all__), "ssm.__all__ has duplicates"
    served = set()
    for name in _ssm_candidates(ssm):
        try:
            ssm.__getattr__(name)  # the lazy hook itself: an imported submodule is an attribute anyway
        except AttributeError:
            continue
        served.add(name)
    unlisted = sorted(served - set(ssm.__all__))
    assert not unlisted, f"ssm serves names that ssm.__all__ does not list: {unlisted}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported at module level by `path` (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    found = set()
    for node in tree.body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me and not me.startswith(name + "."):
                found.add(name)
    return found


def test_no_import_cycle():
    files = {_module_name(p): p for p in _python_files()}
    graph = {m: _imports(p, set(files)) for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def _config_fields() -> set[str]:
    import dataclasses

    from ssm import config
    out = set()
    for obj in vars(config).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            out |= {f.name for f in dataclasses.fields(obj)}
    return out


def test_no_constructor_repeats_a_config_field():
    import inspect

    from ssm.layers.attention import MultiHeadAttention, TransformerBlock
    from ssm.layers.block import S4Block
    from ssm.layers.s4 import S4
    fields = _config_fields() - {"d_state"}
    repeated = {}
    for cls in (S4, S4Block, MultiHeadAttention, TransformerBlock):
        src = ast.parse(inspect.getsource(cls))
        init = next(n for n in ast.walk(src) if isinstance(n, ast.FunctionDef) and n.name == "__init__")
        explicit = {a.arg for a in init.args.args + init.args.kwonlyargs}
        if explicit & fields:
            repeated[cls.__name__] = sorted(explicit & fields)
    assert not repeated, f"constructors that repeat config fields (defaults belong in ssm.config): {repeated}"


def test_layer_class_does_not_branch_on_mode():
    import inspect

    from ssm.layers.s4 import S4
    tree = ast.parse(inspect.getsource(S4))
    offenders = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef) or fn.name == "__init__":
            continue
        for node in ast.walk(fn):
            names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
                     for n in ast.walk(node.test)} if isinstance(node, (ast.If, ast.IfExp)) else set()
            if "mode" in names:
                offenders.append(f"{fn.name}: {ast.unparse(node.test)}")
    assert not offenders, f"S4 methods branching on mode: {offenders}"

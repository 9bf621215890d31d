"""The shape of the code, read statically (AST, lazy imports included): no import circle among
the modules of the four packages, no stage that branches on a task name (DESIGN.md §0: they
ask the registry or the task's recipe), short functions with few parameters (STYLE.md), and
DESIGN.md's import rule between the stages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tasks

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "finetune", "export", "service")
MAX_LINES = 80  # per function, decorators and docstring included
MAX_PARAMS = 7  # per function, `self` and `cls` not counted
# (module, function): why it stays longer or wider.
ROUTE = "a BentoML route: each request field is a parameter (the route's request schema)"
ALLOWED: dict[tuple[str, str], str] = {
    ("service.service", "predict"): ROUTE,
    ("service.service", "predict_file"): ROUTE,
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for b in node.body for n in ast.walk(b) if hasattr(n, "lineno")}
    return lines


def imports(name: str) -> set[str]:
    """The project modules `name` imports anywhere in its body (functions too): `from a.b
    import c` names the module a.b.c where that is one, else a.b."""
    tree, skip = TREES[name], _type_checking_only(TREES[name])
    is_package = MODULES[name].name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_modules():
    graph = {name: imports(name) for name in MODULES}
    assert circles(graph) == [], "modules that import each other (lazy imports included)"


def test_import_rule_between_stages():
    """DESIGN.md: tasks imports no stage; export only tasks, finetune.checkpoint and
    finetune.errors of the others; service only tasks and export.card / export.errors."""
    allowed = {
        "tasks": ("tasks",),
        "finetune": ("tasks", "finetune"),
        "export": ("tasks", "export", "finetune.checkpoint", "finetune.errors"),
        "service": ("tasks", "service", "export.card", "export.errors"),
    }
    wrong = [
        f"{name} imports {target}"
        for name in MODULES
        for target in imports(name)
        if not any(
            target == ok or target.startswith(ok + ".") for ok in allowed[name.split(".")[0]]
        )
    ]
    assert wrong == []


# --------------------------------------------------------------------------- task names


TASK_NAMES = set(tasks.REGISTRY)


def _is_task_value(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in TASK_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_is_task_value(e) for e in node.elts)
    return False


def _task_constants() -> set[str]:
    """Names bound at module level, anywhere in the packages, to a task name or a group of
    them (IMAGE_TASK = "image-classification", TEXT_TASKS = (...), AUDIO = tasks.AUDIO_TASKS)."""
    names: set[str] = set()
    for _ in range(2):  # aliases of aliases
        for tree in TREES.values():
            for node in tree.body:
                if not isinstance(node, ast.Assign):
                    continue
                value = node.value
                values = value.elts if isinstance(value, ast.Tuple) else [value]
                targets = node.targets[0]
                targets = targets.elts if isinstance(targets, ast.Tuple) else [targets]
                for target, v in zip(targets, values, strict=False):
                    alias = isinstance(v, ast.Name | ast.Attribute) and _ref(v) in names
                    if isinstance(target, ast.Name) and (_is_task_value(v) or alias):
                        names.add(target.id)
    return names


def _ref(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def task_comparisons(tree: ast.AST, constants: set[str]) -> list[int]:
    """Lines comparing something with a task name (literal, or a constant bound to one)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        if any(_is_task_value(o) or _ref(o) in constants for o in operands):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_task_comparison_finder_finds_them():
    code = 'X = "object-detection"\nif t == X or t in ("text-classification",) or t != "y":\n  pass'
    tree = ast.parse(code)
    assert task_comparisons(tree, {"X"}) == [2]
    assert task_comparisons(ast.parse('if t == "object-detection": pass'), set()) == [1]
    assert task_comparisons(ast.parse("if t in spec.tasks: pass"), set()) == []


def test_no_stage_compares_task_names():
    constants = _task_constants()
    found = [
        f"{MODULES[name].relative_to(ROOT)}:{line}"
        for name, tree in TREES.items()
        if not name.startswith("tasks")
        for line in task_comparisons(tree, constants)
    ]
    assert found == [], "stages ask the registry (tasks/) or the task's recipe instead"


# --------------------------------------------------------------------------- size


def _functions():
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield name, node


def _params(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return len([n for n in names if n not in ("self", "cls")])


def test_size_checks_count_what_they_say():
    fn = ast.parse("def f(self, a, b=1, *c, d, **e):\n    return 1\n").body[0]
    assert _params(fn) == 5 and fn.end_lineno - fn.lineno + 1 == 2


@pytest.mark.parametrize("limit", ["lines", "parameters"])
def test_functions_are_short_and_narrow(limit):
    too_big = []
    for module, fn in _functions():
        start = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
        size = fn.end_lineno - start + 1 if limit == "lines" else _params(fn)
        if size > (MAX_LINES if limit == "lines" else MAX_PARAMS) and (
            (module, fn.name) not in ALLOWED
        ):
            too_big.append(f"{module}.{fn.name}: {size} {limit}")
    assert too_big == []

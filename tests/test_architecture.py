"""The structure the tree promises (docs/ARCHITECTURE.md), checked on the source: every import of the
project, top-level and inside functions, goes down the declared layers or stays in its own; no module
imports itself back through others; the training core names no task and no model family; and only
the families' registry and the config compare `model.arch`."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("megatron_lax", "tokenizer", "data_prep")

# Lowest first. A module belongs to the longest prefix listed; it may import its own layer or lower ones.
LAYERS = [
    ("foundations", ["megatron_lax.paper", "megatron_lax.parallel.distributed"]),
    ("method", ["megatron_lax.method"]),
    ("families", ["megatron_lax.models"]),
    ("configuration", ["megatron_lax.config"]),
    ("data", ["megatron_lax.data"]),
    ("engines and the training core", ["megatron_lax.parallel", "megatron_lax.training"]),
    ("tasks and loading", ["megatron_lax.tasks", "megatron_lax.loading"]),
    ("commands", ["megatron_lax", "tokenizer", "data_prep"]),  # the root's folders: commands, not installed
    ("experiments", ["megatron_lax.experiments", "megatron_lax.sweep", "megatron_lax.reproduce",
                     "megatron_lax.compare", "megatron_lax.finetune_study"]),
]
CORE = ("megatron_lax.training", "megatron_lax.parallel")
NOT_IN_CORE = ("megatron_lax.tasks", "megatron_lax.models", "megatron_lax.data", "megatron_lax.loading")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str], with_packages: bool = True) -> set[str]:
    """The project modules `name` imports, anywhere in its body; with_packages: and the packages
    that run on the way (importing a.b.c runs a and a.b first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)} if with_packages else {target}
            found |= prefixes & known
    found.discard(name)
    return found


def top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def unresolved_relative_imports(name: str, path: Path, modules: dict[str, Path]) -> list[str]:
    """Relative imports that name neither a module of the project nor a name one defines at its top
    (a broken import, and one the layering check would not see)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    broken = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    continue
                if base not in modules or alias.name not in top_level_names(modules[base]):
                    broken.append(f"{name}: from {'.' * node.level}{node.module or ''} import {alias.name}")
    return broken


def graph(with_packages: bool = True) -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, set(modules), with_packages) for name, path in modules.items()}


def layer_of(name: str) -> int:
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)"
    return max(matches)[1]


def test_every_import_goes_down_the_layers_or_stays_in_its_own():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph(with_packages=False).items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(sorted(upward))


def test_every_relative_import_names_a_module_of_the_project():
    modules = project_modules()
    broken = [b for name, path in modules.items() for b in unresolved_relative_imports(name, path, modules)]
    assert not broken, broken


def test_no_import_cycles():
    edges = graph(with_packages=False)  # what each module names; a child naming its package counts too
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def folder_of(name: str) -> str:
    """The folder a module lives in: megatron_lax.training.trainer -> megatron_lax.training."""
    parts = name.split(".")
    for depth in range(len(parts), 0, -1):
        candidate = REPO.joinpath(*parts[:depth])
        if candidate.is_dir():
            return ".".join(parts[:depth])
    return parts[0]


def test_no_two_folders_import_each_other():
    edges = {(folder_of(m), folder_of(t)) for m, targets in graph(with_packages=False).items() for t in targets}
    edges = {(a, b) for a, b in edges if "megatron_lax" not in (a, b)}  # the root holds layers 0 to 7
    mutual = {f"{a} <-> {b}" for a, b in edges if a < b and (b, a) in edges}
    assert not mutual, sorted(mutual)


def test_the_training_core_knows_no_task_and_no_model_family():
    offending = [f"{m} imports {t}" for m, targets in graph().items() if m.startswith(CORE)
                 for t in targets if t.startswith(NOT_IN_CORE)]
    assert not offending, offending


def test_only_the_family_registry_and_the_config_compare_arch():
    allowed = ("megatron_lax/models/", "megatron_lax/config.py")
    found = []
    for path in [*REPO.glob("megatron_lax/**/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("run_scripts/*.py")]:
        relative = str(path.relative_to(REPO))
        if relative.startswith(allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(side, ast.Attribute) and side.attr == "arch"
                                                     for side in [node.left, *node.comparators]):
                found.append(f"{relative}:{node.lineno}")
    assert not found, found


def format_name_comparisons(path: Path) -> list[int]:
    """Lines that compare `method` (model.method, or a variable of that name) with a literal name."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names_method = any((isinstance(s, ast.Attribute) and s.attr == "method") or
                               (isinstance(s, ast.Name) and s.id == "method") for s in sides)
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                          isinstance(s, (ast.Tuple, ast.List, ast.Set)) for s in sides)
            if names_method and literal:
                lines.append(node.lineno)
    return lines


def test_no_code_outside_the_formats_compares_the_method_with_a_name():
    """A format's knowledge lives in its own file (megatron_lax/method/): nothing else may branch on
    model.method == "svd" (the plug-in test, tests/megatron_lax/test_plugins.py, runs a format that
    no such branch knows)."""
    found = [f"{path.relative_to(REPO)}:{line}"
             for path in [*REPO.glob("megatron_lax/**/*.py"), *REPO.glob("run_scripts/*.py")]
             if not str(path.relative_to(REPO)).startswith("megatron_lax/method/")
             for line in format_name_comparisons(path)]
    assert not found, found


def test_the_method_check_sees_a_comparison(tmp_path):
    assert format_name_comparisons(_write(tmp_path, "if cfg.method == 'cola':\n    pass\n")) == [1]
    assert format_name_comparisons(_write(tmp_path, "x = method in ('svd', 'cola')\n")) == [1]


def test_the_checker_sees_a_function_level_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a function-level import upwards, and two modules importing each other."""
    assert "megatron_lax.tasks" in imports_of("x.core", _write(tmp_path, "def f():\n    from megatron_lax import tasks\n"),
                                               {"megatron_lax", "megatron_lax.tasks"})
    monkeypatch.setattr(__import__(__name__), "graph", lambda **_: {"a": {"b"}, "b": {"a"}})
    try:
        test_no_import_cycles()
    except AssertionError:
        return
    raise AssertionError("a two-module cycle went unnoticed")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "core.py"
    path.write_text(text)
    return path


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for package in PACKAGES for path in (REPO / package).rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long


def test_the_install_adds_one_top_level_package_and_the_root_commands_still_run(monkeypatch):
    """tokenizer/ and data_prep/ are commands run from the repository root over code in megatron_lax/data;
    installed, they would be top-level packages with names other PyPI packages use."""
    import runpy
    import subprocess
    import sys

    import setuptools
    setup = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: setup.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"))
    assert {p.split(".")[0] for p in setup["packages"]} == {"megatron_lax"}
    assert all(s.split("=")[1].startswith("megatron_lax.") for s in setup["entry_points"]["console_scripts"])
    for command in ("tokenizer.train", "data_prep.prepare"):
        usage = subprocess.run([sys.executable, "-m", command, "--help"], cwd=REPO, capture_output=True, text=True)
        assert usage.returncode == 0 and usage.stdout.startswith(f"usage: python -m {command}"), usage.stderr


def test_the_library_holds_no_fault_injection_hook():
    """Faults are injected by wrapping from outside (tests/fault_injection.py): nothing in the step, the
    checkpoint writer or data preparation reads a test variable."""
    readers = [str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
               if "MEGATRON_LAX_TEST" in p.read_text()]
    assert not readers, readers


# The transformers export templates: each is the family's model rewritten against transformers, and
# the export copies the source of the family's pieces it imports into the written modeling file.
TEMPLATES_OF_A_FAMILY = {"megatron_lax.hub.llama", "megatron_lax.hub.vit"}


def test_no_module_outside_models_imports_a_family_by_name():
    """Outside megatron_lax/models/, a family is reached through its registered object (family_of,
    FAMILIES), never by importing its file; the family files come from the registry itself."""
    from megatron_lax.models import FAMILIES
    family_modules = {type(family).__module__ for family in FAMILIES.values()}
    assert family_modules and all(m.startswith("megatron_lax.models.") for m in family_modules), family_modules
    offending = [f"{m} imports {t}" for m, targets in graph(with_packages=False).items()
                 if not m.startswith("megatron_lax.models") and m not in TEMPLATES_OF_A_FAMILY
                 for t in targets if t in family_modules]
    assert not offending, "\n".join(sorted(offending))

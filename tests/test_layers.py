"""The packages stand in layers: a module imports only from its own package and from packages in
lower layers, whether the import sits at the top of the module or inside a function. The order is
written here once (README "Layers" describes it)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom first. Packages in the same layer do not import each other either.
LAYERS = (
    ("errors",),
    ("outputs",),
    ("model",),
    ("parallel", "data"),
    ("train.checkpoint",),
    ("train",),
    ("convert",),
    ("slurm",),
    ("launcher",),
)
RANK = {package: level for level, names in enumerate(LAYERS) for package in names}


def package_of(module: str) -> str | None:
    """The layer package of a gridtrain module name ("gridtrain.train.checkpoint.save" ->
    "train.checkpoint"), None for a name outside gridtrain."""
    parts = module.split(".")
    if parts[0] != "gridtrain" or len(parts) < 2:
        return None
    nested = ".".join(parts[1:3])
    return nested if nested in RANK else parts[1]


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from gridtrain.parallel import groups` names a module of the package it comes from
            found.append((node.lineno, node.module))
    return found


def upward_imports(root: Path) -> list[str]:
    """"file:line: a -> b" for every import of a package that is not in a lower layer."""
    problems = []
    modules = [root / f"{name}.py" for name in RANK if (root / f"{name}.py").is_file()]
    files = modules + sorted(p for name in RANK if not (root / f"{name}.py").is_file()
                             for p in (root / name.replace(".", "/")).glob("*.py"))
    for path in files:
        rel = path.relative_to(root).with_suffix("")
        own = package_of("gridtrain." + ".".join(rel.parts))
        for line, module in imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            target = package_of(module)
            if target is None or target == own:
                continue
            if target not in RANK:
                problems.append(f"{rel}.py:{line}: imports {module}, a package with no layer")
            elif RANK[target] >= RANK[own]:
                problems.append(f"{rel}.py:{line}: {own} imports {module} ({target} is not below {own})")
    return problems


def test_no_package_imports_a_package_above_it():
    assert upward_imports(ROOT) == []


def test_the_check_finds_an_upward_import(tmp_path):
    """Negative control: the same check over a copy of errors.py and model/ in which the model
    imports the launcher inside a function, and the data layer imports parallel (same layer)."""
    for name in ("errors.py", "outputs.py"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    for package in RANK:
        if not (ROOT / f"{package}.py").is_file():
            (tmp_path / package.replace(".", "/")).mkdir(parents=True, exist_ok=True)
    (tmp_path / "model" / "bad.py").write_text("def f():\n    from gridtrain.launcher.cli import main\n")
    (tmp_path / "data" / "sideways.py").write_text("import gridtrain.parallel.layout\n")
    assert upward_imports(tmp_path) == [
        "data/sideways.py:1: data imports gridtrain.parallel.layout (parallel is not below data)",
        "model/bad.py:2: model imports gridtrain.launcher.cli (launcher is not below model)",
    ]

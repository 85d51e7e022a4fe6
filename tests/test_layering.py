"""The import graph (ARCHITECTURE.md, "Layers"): runtime -> autotune -> kernels -> public API
-> hf / cli / bench, with no arrow back; no module reaches into another's private names;
the package never imports the repository's benchmarks/ folder. Read from the source, so
an import inside a function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tritium"
# Module name prefix -> layer; the longest matching prefix wins. tritium.reference imports
# nothing of tritium (the oracle must not share code with what it checks).
LAYERS = {
    "tritium.runtime": 0,
    "tritium.compile_only": 0,  # where kernels run: compiled for a GPU that is not here
    "tritium.autotune": 1,
    "tritium.kernels": 2,
    "tritium": 3,  # the public face: tritium/__init__.py, tritium.nf4
    "tritium.models": 3,  # modules with transformers' parameter names, re-exported by tritium.nf4
    "tritium.hf": 4,
    "tritium.cli": 4,
    "tritium.bench": 4,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every import of tritium or benchmarks in `path`;
    `from tritium import x` names the module tritium.x when there is one."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (node.module, alias.name))
    return [(m, n) for m, n in found if m.split(".")[0] in ("tritium", "benchmarks")]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
    own = _layer(module)
    for target, name in _imports(MODULES[module]):
        if target.startswith("benchmarks"):
            pytest.fail(f"{module} imports {target}: the package must work without the repository's benchmarks/")
        if module == "tritium.reference":
            pytest.fail(f"tritium.reference imports {target}: the oracle shares no code with what it checks")
        assert _layer(target) <= own, f"{module} (layer {own}) imports {target} (layer {_layer(target)})"
        if name is not None and name.startswith("_"):
            pytest.fail(f"{module} imports {target}.{name}, a private name: share it under a public name")


def test_every_top_level_module_is_placed():
    # "tritium" is the prefix of everything: a new top-level module must join LAYERS on purpose.
    loose = {m for m in MODULES if m.count(".") == 1 and m not in LAYERS} - {"tritium.nf4", "tritium.reference"}
    assert not loose, f"place these in LAYERS: {sorted(loose)}"

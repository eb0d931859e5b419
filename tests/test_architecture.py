"""The layers of ppvae (docs/architecture.md): every module imports only from layers below its own, or from its own
subpackage. A module that imports upward fails here, naming the import and the line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ppvae"

# Lowest first. A module may import from a lower rank, or from its own group; peers of one rank (data and
# report) do not import each other. Keep this table and docs/architecture.md the same.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (
        0,
        "ground",
        (
            "errors",
            "_version",
            "_validate",
            "_fs",
            "_archive",
            "_stats",
            "_json",
            "_local_params",
            "_rng",
            "_constraints",
            "_param_store",
        ),
    ),
    (1, "data", ("data",)),
    (1, "report", ("report",)),
    (2, "blocks", ("blocks",)),
    (3, "model", ("vae", "io", "run_meta")),
    (4, "infer", ("infer",)),
    (5, "diagnostics", ("diagnostics",)),
    (6, "compare", ("compare",)),
    (7, "workflow", ("workflow",)),
    (8, "cli", ("cli",)),
]


def _layer(module: str) -> tuple[int, str]:
    """(rank, group) of a dotted module name under ppvae (``"infer.train"`` → (4, "infer"))."""
    head = module.split(".")[0]
    for rank, group, members in LAYERS:
        if head in members:
            return rank, group
    raise AssertionError(f"ppvae.{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:  # ppvae/__init__.py is the front door and may import anything
            out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every ppvae module ``path`` imports (absolute or relative, at any depth of the file), with its line."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name[6:], node.lineno) for a in node.names if a.name.startswith("ppvae.")]
            found += [("", node.lineno) for a in node.names if a.name == "ppvae"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module == "ppvae" or (node.module or "").startswith("ppvae."):
                name = node.module[6:]
            else:
                continue
            for a in node.names:  # from ppvae.data import idx: the module ppvae.data.idx, not the package
                sub = f"{name}.{a.name}" if name else a.name
                if not name or (PACKAGE / (sub.replace(".", "/") + ".py")).exists():
                    found.append((sub, node.lineno))
                elif (name, node.lineno) not in found:
                    found.append((name, node.lineno))
    return found


MODULES = _modules()


def test_every_module_has_a_layer():
    for module, _ in MODULES:
        _layer(module)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_only_down(module: str, path: Path):
    rank, group = _layer(module)
    upward = []
    for target, line in _imports(module, path):
        if target == "" or target == "__version__":
            upward.append(f"line {line}: imports the ppvae package itself (import from its modules instead)")
            continue
        t_rank, t_group = _layer(target)
        if t_group != group and t_rank >= rank:
            upward.append(f"line {line}: ppvae.{target} is in layer {t_group!r} (rank {t_rank}), not below {group!r}")
    assert not upward, f"ppvae.{module} ({group}, rank {rank}) imports upward:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from ppvae.infer.train import fit\nfrom ..compare import grid\n")
    assert _imports("blocks.x", bad) == [("infer.train", 1), ("compare.grid", 2)]
    assert _layer("infer.train")[0] > _layer("blocks.priors")[0]


def import_depth() -> int:
    """The longest chain of ppvae module imports (modules, not packages), for docs/architecture.md."""
    graph: dict[str, set[str]] = {}
    names = {m for m, _ in MODULES}
    for module, path in MODULES:
        graph[module] = {t for t, _ in _imports(module, path) if t in names and t != module}
    memo: dict[str, int] = {}

    def depth(m: str, seen: frozenset[str]) -> int:
        if m in memo:
            return memo[m]
        d = 1 + max((depth(t, seen | {m}) for t in graph[m] if t not in seen), default=0)
        memo[m] = d
        return d

    return max(depth(m, frozenset()) for m in graph)


def test_import_chains_stay_short():
    # 16 levels before the layering; the layers put the tallest chain at the number in docs/architecture.md.
    assert import_depth() <= 12

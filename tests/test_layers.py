"""The layer order of DESIGN.md: corpora -> envs -> agents -> distill -> benchmarks. A package
never imports one above it (anywhere in a module, lazy imports included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["corpora", "envs", "agents", "distill", "benchmarks"]


def upward_imports(order=ORDER, root=ROOT) -> list[tuple[str, int, str]]:
    bad = []
    for pkg in order:
        for f in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top in order and order.index(top) > order.index(pkg):
                        bad.append((str(f.relative_to(root)), node.lineno, m))
    return bad


def test_no_package_imports_a_higher_layer():
    assert upward_imports() == []


def test_the_check_finds_an_upward_import(tmp_path):
    (tmp_path / "low").mkdir()
    (tmp_path / "high").mkdir()
    (tmp_path / "low" / "m.py").write_text("def f():\n    from high.x import y\n")
    (tmp_path / "high" / "x.py").write_text("import low.m\n")
    assert upward_imports(["low", "high"], tmp_path) == [("low/m.py", 2, "high.x")]

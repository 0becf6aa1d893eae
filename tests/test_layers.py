"""The layer order of DESIGN.md: common -> corpora -> envs -> agents -> distill -> benchmarks. A
package never imports one above it (anywhere in a module, lazy imports included); ``common`` (the
shared utilities) imports none of the others."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["common", "corpora", "envs", "agents", "distill", "benchmarks"]


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


def test_every_top_level_package_has_a_layer():
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()} - {"tests"}
    assert packages == set(ORDER)


def test_the_check_finds_an_upward_import(tmp_path):
    for name in ("low", "mid", "high"):
        (tmp_path / name).mkdir()
    (tmp_path / "low" / "m.py").write_text("import os\n\n\ndef f():\n    from high.x import y\n")
    (tmp_path / "low" / "n.py").write_text("import mid.z, json\n")
    (tmp_path / "mid" / "z.py").write_text("from low import m\nfrom . import q\n")  # down and relative: fine
    (tmp_path / "high" / "x.py").write_text("import low.m\nimport mid.z\n")
    assert upward_imports(["low", "mid", "high"], tmp_path) == [("low/m.py", 5, "high.x"), ("low/n.py", 1, "mid.z")]

"""The source tree reads as the architecture: the module graph of mergex-core has no cycles
and follows the layering ``error, job → format → numeric → kernels → methods → engine``
(``scripts/module_graph.py``), no source file grows past about 600 lines outside the
SIMD kernels and test tables, and no test module imports another (what tests share lives in
``tests/support/``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# SIMD kernels (one build per file) and test tables are allowed to be long.
LONG_OK = {
    "rust/mergex-core/src/kernels/avx2.rs",
    "rust/mergex-core/src/kernels/avx512.rs",
    "rust/mergex-core/tests/fuzz_parsers.rs",
}
LIMIT = 600


def test_module_graph_has_no_cycles_and_respects_the_layers():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "module_graph.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no cycles, layering respected" in r.stdout


def test_no_source_file_is_over_the_limit():
    long = []
    for pattern in ("rust/**/*.rs", "python/**/*.py"):
        for f in ROOT.glob(pattern):
            rel = f.relative_to(ROOT).as_posix()
            if "/target/" in rel or rel in LONG_OK:
                continue
            n = len(f.read_text(encoding="utf-8").splitlines())
            if n > LIMIT:
                long.append(f"{rel}: {n} lines")
    assert not long, long


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import module_graph

    src = tmp_path / "src"
    (src / "methods").mkdir(parents=True)
    (src / "lib.rs").write_text("pub mod engine;\npub mod methods;\n")
    (src / "engine.rs").write_text("use crate::format::x;\n")
    (src / "methods" / "mod.rs").write_text("mod a;\npub use a::Thing;\n")
    (src / "methods" / "a.rs").write_text("use super::Other;\nuse crate::engine::y;\n")
    monkeypatch.setattr(module_graph, "SRC", src)
    edges = module_graph.graph()
    assert module_graph.cycles(edges) == [[("methods",), ("methods", "a")]]
    assert module_graph.violations(edges) == ["methods::a uses engine"]


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (``test_*``) that the Python file at ``path`` imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0].startswith("test_")]
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.module.split(".")[0].startswith("test_"):
                found.append(node.module)
            elif not node.module:  # from . import test_x
                found += [a.name for a in node.names if a.name.startswith("test_")]
    return found


def test_no_test_module_imports_another():
    tests = ROOT / "tests"
    files = [*tests.glob("test_*.py"), tests / "conftest.py", *(tests / "support").glob("*.py")]
    bad = [
        f"{f.relative_to(ROOT).as_posix()} imports {m}"
        for f in sorted(files)
        for m in imported_test_modules(f)
    ]
    assert not bad, "shared test code belongs in tests/support/: " + "; ".join(bad)


def test_the_import_check_finds_nested_imports(tmp_path):
    f = tmp_path / "test_x.py"
    f.write_text(
        "import numpy, test_a\n"
        "from support import models\n"
        "from test_b.sub import c\n"
        "def test():\n"
        "    if True:\n"
        "        import test_c as t\n"
        "        from test_d import e\n"
    )
    assert imported_test_modules(f) == ["test_a", "test_b.sub", "test_c", "test_d"]

"""The source tree reads as the architecture: the module graph of mergex-core has no cycles
and follows the layering ``error, job → format → numeric → kernels → methods → engine``
(``scripts/module_graph.py``), and no source file grows past about 600 lines outside the
SIMD kernels and test tables.
"""

from __future__ import annotations

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

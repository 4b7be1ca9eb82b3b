"""Imports point one way: read every module's imports (ast, nothing is imported) and check the
architecture's arrows, including imports inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "asam_tune"

# profiler/handover.py drives a real worker process from runtime/ to time the handover; the
# lead is moving what it needs out of runtime/. Until then it is the one exception.
PROFILER_MAY_IMPORT_RUNTIME = {"profiler/handover.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, wherever the import statement is."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # 'from asam_tune import api' imports the module asam_tune.api
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _modules(folder: str | None = None) -> list[Path]:
    root = PACKAGE / folder if folder else PACKAGE
    return sorted(root.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _offenders(paths: list[Path], forbidden: str, allowed: set[str] = frozenset()) -> dict[str, list[str]]:
    bad = {}
    for path in paths:
        if _relative(path) in allowed:
            continue
        hits = sorted(m for m in _imports(path) if m == forbidden or m.startswith(forbidden + "."))
        if hits:
            bad[_relative(path)] = hits
    return bad


def test_the_reader_sees_relative_and_nested_imports(tmp_path):
    sample = PACKAGE / "tune" / "__init__.py"
    assert "asam_tune.tune.trial" in _imports(sample)  # imported inside __getattr__
    assert "asam_tune.cli.commands" in _imports(PACKAGE / "cli" / "train.py")


@pytest.mark.parametrize("folder", ["bench", "tune"])
def test_bench_and_tune_never_import_the_command_line(folder):
    assert _offenders(_modules(folder), "asam_tune.cli") == {}


def test_records_never_import_torch_or_a_later_stage():
    records = _modules("records")
    assert records
    assert _offenders(records, "torch") == {}
    for later in ("profiler", "costmodel", "runtime", "cli", "bench", "tune", "api", "workloads", "fingerprint"):
        assert _offenders(records, f"asam_tune.{later}") == {}, later


def test_the_profiler_never_imports_the_runtime():
    assert _offenders(_modules("profiler"), "asam_tune.runtime", PROFILER_MAY_IMPORT_RUNTIME) == {}


def test_the_cost_model_never_imports_the_runtime_or_the_command_line():
    for later in ("runtime", "cli", "bench", "tune"):
        assert _offenders(_modules("costmodel"), f"asam_tune.{later}") == {}, later


def test_the_shared_leaves_import_no_command_code():
    leaves = [PACKAGE / "arguments.py", PACKAGE / "steptiming.py", PACKAGE / "timing.py"]
    for later in ("cli", "bench", "tune"):
        assert _offenders(leaves, f"asam_tune.{later}") == {}, later
    arguments = {m for m in _imports(PACKAGE / "arguments.py") if m.startswith("asam_tune")}
    assert arguments <= {"asam_tune.errors", "asam_tune.errors.AsamTuneError", "asam_tune.errors.UserInputError",
                         "asam_tune.workloads", "asam_tune.workloads.parse_shape"}

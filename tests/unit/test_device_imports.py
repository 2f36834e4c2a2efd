"""The device side runs on Python 3.9+ with only zstandard, msgpack and xxhash."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from device_side import PKG, ROOT, device_files, loaded


def test_device_side_is_what_we_expect() -> None:
    files = {str(p.relative_to(PKG)) for p in device_files()}
    # The core of the device side; more may join, none of these may leave it.
    assert {"format/reader.py", "format/records.py", "importer/containerd.py",
            "importer/docker.py", "importer/podman.py", "holdings.py", "report.py", "usecases/device.py",
            "cli/device.py", "files.py", "logs.py"} <= files
    for packer_only in ("manifest.py", "resolve.py", "registry/client.py", "transfer/ssh.py",
                        "usecases/packer.py", "cli/packer.py", "cache.py", "plan.py", "pack.py"):
        assert packer_only not in files


def test_device_imports_pull_in_no_packer_dependency() -> None:
    assert loaded()["packer"] == []


def test_main_cli_imports_no_packer_dependency_for_device_commands() -> None:
    assert "edgebundle.cli.packer" not in loaded()["edgebundle"]


# ---------------------------------------------------------------------------
# Python 3.9 syntax and annotations

BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def _annotations(tree: ast.AST) -> Iterator[ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in args.posonlyargs + args.args + args.kwonlyargs + \
                    [x for x in (args.vararg, args.kwarg) if x is not None]:
                if a.annotation is not None:
                    yield a.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _new_style(annotation: ast.expr) -> Optional[str]:
    """Why ``annotation`` needs Python 3.10 when evaluated, or None."""
    for node in ast.walk(annotation):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return "X | Y"
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and \
                node.value.id in BUILTIN_GENERICS:
            return f"{node.value.id}[...]"
    return None


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
               any(a.name == "annotations" for a in n.names) for n in tree.body)


def test_new_style_detector_works() -> None:
    tree = ast.parse("def f(a: int | None, b: 'list[int]') -> list[str]: ...\nx: dict[str, int] = {}\n")
    found = [_new_style(a) for a in _annotations(tree)]
    assert found == ["X | Y", None, "list[...]", "dict[...]"]
    assert not _has_future_annotations(tree)
    assert _has_future_annotations(ast.parse("from __future__ import annotations\n"))


@pytest.mark.parametrize("path", device_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_device_module_parses_as_python_39(path: Path) -> None:
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src, filename=str(path), feature_version=(3, 9))
    matches = [n.lineno for n in ast.walk(tree) if type(n).__name__ == "Match"]
    assert not matches, f"{path}: match statements at lines {matches}"
    if not _has_future_annotations(tree):
        offending: List[Tuple[int, str]] = [
            (a.lineno, why) for a in _annotations(tree) if (why := _new_style(a)) is not None]
        assert not offending, (f"{path} uses 3.10 annotations without "
                               f"`from __future__ import annotations`: {offending}")


# ---------------------------------------------------------------------------
# Layering: the format knows nothing of what uses it

FORBIDDEN = ("edgebundle.importer", "edgebundle.cli", "edgebundle.registry", "edgebundle.transfer",
             "edgebundle.manifest", "edgebundle.resolve")


def _imported_modules(path: Path, package: str) -> Iterator[Tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # `from .. import importer` imports a module too
                yield node.lineno, f"{mod}.{alias.name}"


def test_import_resolver_handles_relative_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from ..importer import x\nfrom . import records\nimport edgebundle.cli\n"
                 "from .. import transfer\n")
    mods = [m for _, m in _imported_modules(f, "edgebundle.format")]
    assert "edgebundle.importer" in mods
    assert "edgebundle.format.records" in mods
    assert "edgebundle.cli" in mods
    assert "edgebundle.transfer" in mods


@pytest.mark.parametrize("path", sorted((PKG / "format").glob("*.py")),
                         ids=lambda p: p.name)
def test_format_layering(path: Path) -> None:
    bad = [(line, mod) for line, mod in _imported_modules(path, "edgebundle.format")
           if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad}"

"""Our only check against TensorRT itself here: every ``trt`` name each version's code path uses must be in that
version's real Python bindings.

The bindings wheels (``tensorrt-bindings`` 8.6, ``tensorrt-cu12-bindings`` 10.x, ``tensorrt-cu13-bindings``
11.x) are real, about 1 MB each, but their ``tensorrt.so`` cannot be imported without NVIDIA's libraries, so the
names are read from the strings the module registers. The code path of a version is read from the source of
``optimize/tensorrt_backend.py`` with its ``self.major`` / ``builder.major`` and ``hasattr(trt, ...)`` branches
resolved for that version.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

WHEELS = {  # version -> pip requirement
    "8.6": "tensorrt-bindings==8.6.1",
    "10": "tensorrt-cu12-bindings==10.16.1.11",
    "11": "tensorrt-cu13-bindings==11.4.0.106",
}
MAJOR = {"8.6": 8, "10": 10, "11": 11}
# variables in tensorrt_backend.py that hold TensorRT objects: attributes read on them are TensorRT API
TRT_OBJECTS = {"trt", "builder", "config", "network", "parser", "opt_profile", "cache", "engine", "context",
               "runtime", "t"}
SOURCE = ROOT / "optimize" / "tensorrt_backend.py"


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_CACHE", Path.home() / ".cache" / "edgeopt")) / "tensorrt-wheels"


def _wheel(requirement: str) -> Path:
    folder = _cache_dir()
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-{requirement.split('==')[1]}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.11", "--implementation", "cp",
                           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
                           "-d", str(folder), requirement], capture_output=True, text=True, timeout=300)
    found = sorted(folder.glob(f"{name}-{requirement.split('==')[1]}-*.whl"))
    if proc.returncode != 0 or not found:
        pytest.skip(f"cannot download {requirement} (offline?): {proc.stderr.strip().splitlines()[-1:]}")
    return found[0]


class Bindings:
    """The names a wheel's tensorrt.so registers. pybind11 keeps each class, method, property and enum value
    name as a NUL-terminated string; the linker may share one string's tail with another ("Logger" inside
    "ILogger"), so a name counts as present when ``name\\0`` occurs anywhere in the binary."""

    def __init__(self, requirement: str):
        with zipfile.ZipFile(_wheel(requirement)) as zf:
            self.blob = zf.read(next(n for n in zf.namelist() if n.endswith("tensorrt.so")))

    def __contains__(self, name: str) -> bool:
        return name.encode() + b"\0" in self.blob


class _PathNames(ast.NodeVisitor):
    """Collect the TensorRT names a version's path uses, resolving version and hasattr branches."""

    def __init__(self, major: int, available: Bindings):
        self.major, self.available, self.names = major, available, set()

    def _condition(self, test: ast.expr) -> bool | None:
        src = ast.unparse(test)
        m = re.fullmatch(r"(?:self|builder)\.major\s*(<|<=|>=|>|==)\s*(\d+)", src)
        if m:
            return eval(f"{self.major} {m.group(1)} {m.group(2)}")  # noqa: S307 - a comparison of two ints
        m = re.fullmatch(r"(not )?hasattr\(trt, '(\w+)'\)", src)
        if m:
            return (m.group(2) in self.available) != bool(m.group(1))
        m = re.fullmatch(r"(.+) and (.+)", src)  # "builder.major >= 11 and cfg.precision == 'fp16'"
        if m:
            first = self._condition(ast.parse(m.group(1), mode="eval").body)
            return False if first is False else None
        return None

    def _block(self, stmts: list[ast.stmt]) -> bool:
        """Visit statements in order; False once a taken branch returned (the rest is unreachable)."""
        for stmt in stmts:
            if isinstance(stmt, ast.If):
                taken = self._condition(stmt.test)
                if taken is None:
                    self.visit(stmt.test)
                    self._block(stmt.body)
                    self._block(stmt.orelse)
                    continue
                branch = stmt.body if taken else stmt.orelse
                if not self._block(branch):
                    return False
                continue
            self.visit(stmt)
            if isinstance(stmt, (ast.Return, ast.Raise)):
                return False
        return True

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._block(node.body)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        root = base.id if isinstance(base, ast.Name) else None
        if root == "self" and chain:
            root = chain.pop()  # self.builder.x -> builder.x
        if root in TRT_OBJECTS:
            self.names.update(chain)
        self.generic_visit(node)


def names_used(source: str, major: int, available: Bindings) -> set[str]:
    visitor = _PathNames(major, available)
    for node in ast.parse(source).body:  # nested functions and classes are reached through their parents
        if isinstance(node, ast.FunctionDef):
            visitor.visit_FunctionDef(node)
        elif isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef):
                    visitor.visit_FunctionDef(method)
    # names that are Python's or ours, not TensorRT's
    return visitor.names - {"__version__", "major", "logger", "trt", "builder"}


@pytest.mark.parametrize("version", list(WHEELS))
def test_every_name_our_path_uses_exists_in_that_tensorrt(version):
    available = Bindings(WHEELS[version])
    used = names_used(SOURCE.read_text(), MAJOR[version], available)
    assert {"build_serialized_network", "OnnxParser", "set_memory_pool_limit", "execute_async_v3"} <= used
    assert ("STRONGLY_TYPED" in used) == (version == "11") and ("EXPLICIT_BATCH" in used) == (version == "8.6")
    missing = sorted(n for n in used if n not in available)
    assert not missing, f"TensorRT {version} has no {missing}; guard these by version in {SOURCE.name}"


def test_the_check_catches_a_removed_name():
    """BuilderFlag.FP16 and EXPLICIT_BATCH are gone in TensorRT 11: unguarded use must be reported."""
    v11 = Bindings(WHEELS["11"])
    snippet = ("def build(trt, config):\n"
               "    config.set_flag(trt.BuilderFlag.FP16)\n"
               "    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)\n")
    used = names_used(snippet, 11, v11)
    assert sorted(n for n in used if n not in v11) == ["EXPLICIT_BATCH", "FP16"]
    assert "FP16" in Bindings(WHEELS["10"]) and "EXPLICIT_BATCH" in Bindings(WHEELS["8.6"])
    assert "IProgressMonitor" not in Bindings(WHEELS["8.6"])  # hence the hasattr guard on 8.6


def test_build_engine_without_tensorrt_says_how_to_get_it(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from conftest import error_line, run_cli

    onnx_file = tmp_path / "m.onnx"
    import torch

    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 16, 16),), str(onnx_file), dynamo=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    proc = run_cli("-q", "build-engine", "--onnx", onnx_file, "--backend", "tensorrt", "--out", tmp_path / "m.engine")
    assert proc.returncode == 2 and "pip install tensorrt" in error_line(proc)
    assert "--backend onnxruntime" in error_line(proc) and not (tmp_path / "m.engine").exists()

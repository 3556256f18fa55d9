"""Our only check against TensorRT itself here: every ``trt`` name each version's code path in
``optimize/tensorrt_backend.py`` uses must exist *where it is used* in that version, and not be deprecated there
unless ``ALLOWED_DEPRECATED`` says why.

Two sources per release (``RELEASES``):

- **Membership and deprecation** from ``tests/fixtures/tensorrt_<version>_api.json``: the classes (methods,
  properties, bases), enums (values), module functions and deprecations that NVIDIA/TensorRT's pybind11 sources
  declare on that release branch, extracted by ``tests/fixtures/extract_tensorrt_api.py`` (each fixture names its
  branch and commit). So ``trt.BuilderFlag.FP16`` must be a value of ``BuilderFlag``, ``config.set_flag`` a
  method of ``IBuilderConfig``, ``trt.Logger.WARNING`` a member of ``Logger`` or of a base. A name is deprecated
  when its binding is wrapped in ``utils::deprecate*`` or its docstring (or its class's ``:ivar``) is marked
  ``[DEPRECATED]``; a property whose setter alone is wrapped (``ITensor.dtype`` in 10.12) only when assigned.
  Offline; 8.5 and 10.3 have only this (8.5 has no bindings-only wheel).
- **The shipped binary** for 8.6, 10.16 and 11.4: the real bindings wheels (``tensorrt-bindings`` 8.6.1,
  ``tensorrt-cu12-bindings`` 10.16.1.11, ``tensorrt-cu13-bindings`` 11.4.0.106, about 1 MB each, cached in
  ``~/.cache/edgeopt/tensorrt-wheels``; skipped offline). Their ``tensorrt.so`` cannot be imported without
  NVIDIA's libraries, but pybind11 keeps every name as a NUL-terminated string: every name used must be there,
  and every fixture name must be (``test_the_fixtures_describe_the_shipped_binaries``: the sources match the
  binary). Membership is not read from the binary: the linker stores a string once for all its users (``INT8``
  for ``BuilderFlag`` and ``DataType``) and the value docstrings, which would name the enum, lie elsewhere.

``check()`` reports which of these applied to each name (``Report.checked``). Limits: a variable is typed by its
name (``TRT_CLASSES``); the result of a call (``config.get_timing_cache().serialize``) is not typed, and a name
on an object whose class the version does not have is only checked to exist somewhere; names the package's
Python code adds are known only at module level, dunders are not checked; the 11.x fixture is from
``release/11.1`` (the newest published sources) while the wheel is 11.4, so a name added in 11.2-11.4 is reported
missing until a newer fixture is extracted; deprecations are what the Python bindings mark.

A version's path is the source with its branches resolved for that version: ``self.major`` / ``builder.major``
(an int) and ``self.version`` / ``builder.version`` (a ``(major, minor)`` tuple) compared with literals or module
constants (``STRONGLY_TYPED_FROM = (10, 12)``), names assigned such a comparison (``self.strongly_typed``),
``hasattr(trt, "Name")``, ``hasattr(config, "member")``, and ``and``/``or``/``not`` of those, in ``if`` and
conditional expressions. A ``return`` or ``raise`` on a taken branch ends the path, and a private helper
(``_progress_monitor``) is on it only where a call to it is.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import operator
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, skip_locally_fail_in_ci

SOURCE = ROOT / "optimize" / "tensorrt_backend.py"
FIXTURES = ROOT / "tests" / "fixtures"


@dataclass(frozen=True)
class Release:
    version: tuple[int, int]  # what ``self.version`` is on it; ``self.major`` is version[0]
    fixture: str
    wheel: str | None  # pip requirement of its bindings-only wheel


RELEASES = {  # the versions whose path is checked: JetPack 5.1, JetPack 6.0, JetPack 6.1/6.2, servers
    "8.5": Release((8, 5), "tensorrt_8.5_api.json", None),
    "8.6": Release((8, 6), "tensorrt_8.6_api.json", "tensorrt-bindings==8.6.1"),
    "10.3": Release((10, 3), "tensorrt_10.3_api.json", None),  # the weakly typed 10.x path (before 10.12)
    "10.16": Release((10, 16), "tensorrt_10.16_api.json", "tensorrt-cu12-bindings==10.16.1.11"),
    "11.4": Release((11, 4), "tensorrt_11.1_api.json", "tensorrt-cu13-bindings==11.4.0.106"),
}
# variables in tensorrt_backend.py holding TensorRT objects, and their Python class
TRT_CLASSES = {"builder": "Builder", "config": "IBuilderConfig", "network": "INetworkDefinition",
               "parser": "OnnxParser", "opt_profile": "IOptimizationProfile", "engine": "ICudaEngine",
               "context": "IExecutionContext", "runtime": "Runtime", "cache": "ITimingCache", "t": "ITensor",
               "inspector": "EngineInspector"}
TRT_OBJECTS = {"trt", *TRT_CLASSES}
# deprecated names our code uses on purpose: (release label, "Owner.name") -> why. Empty: the weakly typed path
# (BuilderFlag.FP16/INT8) stops at 10.11, before those flags were deprecated in 10.12. An entry looks like
# ("10.16", "BuilderFlag.FP16"): "the only way to get FP16 without rewriting the ONNX before 10.12".
ALLOWED_DEPRECATED: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------------------------
# a version's API: the fixture (membership, deprecation) and, where there is a wheel, the binary


def _cache_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_CACHE", Path.home() / ".cache" / "edgeopt")) / "tensorrt-wheels"


_UNAVAILABLE: dict[str, str] = {}  # requirement -> why it could not be downloaded (tried once per session)


def _wheel(requirement: str) -> Path:
    if requirement in _UNAVAILABLE:
        skip_locally_fail_in_ci(_UNAVAILABLE[requirement])
    folder = _cache_dir()
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.11", "--implementation", "cp",
                           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
                           "-d", str(folder), requirement], capture_output=True, text=True, timeout=300)
    found = sorted(folder.glob(pattern))
    if proc.returncode != 0 or not found:
        why = proc.stderr.strip().splitlines()[-1:]
        _UNAVAILABLE[requirement] = f"cannot download {requirement} from PyPI (offline?): {why}"
        skip_locally_fail_in_ci(_UNAVAILABLE[requirement])
    return found[0]


class Binary:
    """The names a wheel's tensorrt.so registers. pybind11 keeps each class, method, property and enum value
    name as a NUL-terminated string; the linker may share one string's tail with another ("Logger" inside
    "ILogger"), so a name counts as present when ``name\\0`` occurs anywhere in the binary."""

    def __init__(self, requirement: str):
        self.requirement = requirement
        with zipfile.ZipFile(_wheel(requirement)) as zf:
            self.blob = zf.read(next(n for n in zf.namelist() if n.endswith("tensorrt.so")))
        self._whole = set(self.blob.split(b"\0"))

    def __contains__(self, name: str) -> bool:
        key = name.encode()
        return key in self._whole or key + b"\0" in self.blob


class Api:
    """One release's Python API: the fixture, and the shipped binary when there is a wheel for it."""

    def __init__(self, label: str, binary: Binary | None = None):
        self.label, self.release = label, RELEASES[label]
        data = json.loads((FIXTURES / self.release.fixture).read_text())
        self.source = f"{data['provenance']['repo']}@{data['provenance']['ref']}"
        self.classes = {k: set(v) for k, v in data["classes"].items()}
        self.enums = {k: set(v) for k, v in data["enums"].items()}
        self.bases, self.deprecated = data["bases"], data["deprecated"]
        self.module = ({k for k in self.classes if "." not in k} | {k for k in self.enums if "." not in k}
                       | set(data["functions"]) | set(data["python"]))
        self.python = set(data["python"])
        self.binary = binary

    def member(self, owner: str, name: str) -> str | None:
        """``Owner.name`` where ``name`` resolves on ``owner`` (through its bases), else None."""
        if name in self.classes.get(owner, ()) or name in self.enums.get(owner, ()):
            return f"{owner}.{name}"
        for base in self.bases.get(owner, ()):
            found = self.member(base, name)
            if found:
                return found
        return None

    def anywhere(self, name: str) -> bool:
        return name in self.module or any(name in v for v in (*self.classes.values(), *self.enums.values()))


@functools.lru_cache(maxsize=None)
def _binary(requirement: str) -> Binary:
    return Binary(requirement)


def api_for(label: str, *, with_binary: bool = True) -> Api:
    wheel = RELEASES[label].wheel
    return Api(label, _binary(wheel) if wheel and with_binary else None)


# ---------------------------------------------------------------------------------------------------------------
# the code path of one version


@dataclass(frozen=True)
class Use:
    """``root.a.b`` read at ``line``, ``root`` being ``trt`` or a variable in TRT_CLASSES."""

    root: str
    chain: tuple[str, ...]
    line: int
    store: bool = False  # assigned to (a property's setter), not read

    def __str__(self) -> str:
        return f"{'.'.join((self.root, *self.chain))} (line {self.line})"


def _reroot(node: ast.expr) -> tuple[str | None, list[str]]:
    """``self.builder.create_network`` -> ("builder", ["create_network"]); ("x", []) for a bare name."""
    chain, base = [], node
    while isinstance(base, ast.Attribute):
        chain.append(base.attr)
        base = base.value
    if not isinstance(base, ast.Name):
        return None, []
    chain.reverse()
    root = base.id
    while root in ("self", "builder") and chain and chain[0] in TRT_OBJECTS:  # self.trt.X, builder.trt.X
        root = chain.pop(0)
    return root, chain


_OPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}


def _literal(node: ast.expr):
    """An int or a tuple of ints written in the source, else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Tuple) and all(isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts):
        return tuple(e.value for e in node.elts)
    return None


def _own_attr(node: ast.expr) -> str | None:
    """``x`` for ``self.x``, ``builder.x`` or a bare name ``x``."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "builder"):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


class _Path(ast.NodeVisitor):
    """Collect the TensorRT attribute reads on a version's path, resolving version and hasattr branches.

    Version expressions: ``self.major``/``builder.major``/``major`` (an int), ``self.version``/``builder.version``/
    ``version`` (a tuple), module constants (``STRONGLY_TYPED_FROM = (10, 12)``) and names assigned a version
    comparison (``self.strongly_typed = self.version >= STRONGLY_TYPED_FROM``).
    """

    def __init__(self, api: Api, tree: ast.Module):
        self.api, self.uses, self.calls = api, set(), set()
        self.constants = {n.targets[0].id: _literal(n.value) for n in tree.body
                          if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
                          and _literal(n.value) is not None}
        self.flags = {_own_attr(n.targets[0]): n.value for n in ast.walk(tree)
                      if isinstance(n, ast.Assign) and len(n.targets) == 1 and _own_attr(n.targets[0])
                      and isinstance(n.value, (ast.Compare, ast.BoolOp, ast.UnaryOp))}
        self._resolving: set[str] = set()

    def _value(self, node: ast.expr):
        """An int or tuple for version expressions, constants and literals; None when it is neither."""
        if _literal(node) is not None:
            return _literal(node)
        name = _own_attr(node)
        if name == "major":
            return self.api.release.version[0]
        if name == "version":
            return self.api.release.version
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        return None

    def _condition(self, test: ast.expr) -> bool | None:
        """True or False when ``test`` is decided by the version alone; None otherwise."""
        if isinstance(test, ast.BoolOp):
            parts = [self._condition(v) for v in test.values]
            decisive = isinstance(test.op, ast.Or)  # True decides an "or", False an "and"
            if decisive in parts:
                return decisive
            return None if None in parts else not decisive
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = self._condition(test.operand)
            return None if inner is None else not inner
        if isinstance(test, ast.Compare):
            values = [self._value(v) for v in (test.left, *test.comparators)]
            if None in values or not all(type(op) in _OPS for op in test.ops):
                return None
            if len({type(v) for v in values}) != 1:  # self.version < 10: a bug, not a branch to guess
                raise TypeError(f"compares a version tuple with an int: {ast.unparse(test)}")
            return all(_OPS[type(op)](a, b) for op, a, b in zip(test.ops, values, values[1:]))
        if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr"
                and len(test.args) == 2 and isinstance(test.args[1], ast.Constant)):
            root, chain = _reroot(test.args[0])
            name = test.args[1].value
            if root == "trt" and not chain:
                return name in self.api.module
            if root in TRT_CLASSES and not chain:
                return self.api.member(TRT_CLASSES[root], name) is not None
        name = _own_attr(test)
        if name in self.flags and name not in self._resolving:
            self._resolving.add(name)
            try:
                return self._condition(self.flags[name])
            finally:
                self._resolving.discard(name)
        return None

    def _block(self, stmts: list[ast.stmt]) -> bool:
        """Visit statements in order; False once the path has returned or raised (the rest is unreachable)."""
        for stmt in stmts:
            if isinstance(stmt, ast.If):
                taken = self._condition(stmt.test)
                if taken is None:
                    self.visit(stmt.test)
                    ends_body, ends_else = not self._block(stmt.body), not self._block(stmt.orelse)
                    if ends_body and ends_else and stmt.orelse:
                        return False
                elif not self._block(stmt.body if taken else stmt.orelse):
                    return False
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in stmt.decorator_list:
                    self.visit(decorator)
                self._block(stmt.body)
            elif isinstance(stmt, ast.ClassDef):
                for base in (*stmt.bases, *stmt.decorator_list):
                    self.visit(base)
                self._block(stmt.body)
            elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try)):
                ends = self._compound(stmt)
                if ends and isinstance(stmt, (ast.With, ast.AsyncWith)):
                    return False
            else:
                self.visit(stmt)
                if isinstance(stmt, (ast.Return, ast.Raise)):
                    return False
        return True

    def _compound(self, stmt: ast.stmt) -> bool:
        """Visit a loop/with/try: expressions as usual, statement lists as blocks; True if its body ends."""
        ends = False
        for field, value in ast.iter_fields(stmt):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                ended = not self._block(value)
                ends = ends or (field == "body" and ended)
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, ast.excepthandler):
                        if item.type is not None:
                            self.visit(item.type)
                        self._block(item.body)
                    elif isinstance(item, ast.AST):
                        self.visit(item)
            elif isinstance(value, ast.AST):
                self.visit(value)
        return ends

    def visit_IfExp(self, node: ast.IfExp) -> None:
        taken = self._condition(node.test)
        if taken is None:
            self.generic_visit(node)
        else:
            self.visit(node.body if taken else node.orelse)

    def visit_Call(self, node: ast.Call) -> None:
        name = _own_attr(node.func)
        if name:
            self.calls.add(name)
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        root, chain = _reroot(node)
        if root in TRT_OBJECTS and chain:
            self.uses.add(Use(root, tuple(chain), node.lineno, isinstance(node.ctx, ast.Store)))
        base = node
        while isinstance(base, ast.Attribute):
            base = base.value
        if not isinstance(base, ast.Name):  # network.get_input(i).name: the call is read too
            self.visit(base)


def _private(name: str) -> bool:
    return name.startswith("_") and not _dunder(name)


def uses_on_path(source: str, api: Api) -> set[Use]:
    """The TensorRT reads on ``api``'s release path through ``source``.

    Public functions and methods are entry points; a private helper (``_name``) is on the path only when a call
    to it is (``_progress_monitor`` is called under ``hasattr(trt, "IProgressMonitor")``), unless nothing in the
    module calls it.
    """
    tree = ast.parse(source)
    visitor = _Path(api, tree)
    functions: dict[str, list[ast.FunctionDef]] = {}
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        if isinstance(node, ast.ClassDef):
            for base in (*node.bases, *node.decorator_list):
                visitor.visit(base)
        for member in members:
            if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(member.name, []).append(member)
            else:
                visitor._block([member])
    called = {_own_attr(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    todo, done = [n for n in functions if not _private(n) or n not in called], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        for function in functions[name]:
            visitor._block([function])
        todo.extend(sorted(n for n in visitor.calls if n in functions and n not in done))
    return visitor.uses


def own_names(source: str) -> set[str]:
    """Methods and ``self.x`` attributes of the classes in ``source``: ``builder.major`` on our EngineBuilder
    is ours, not TensorRT's."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


@dataclass(frozen=True)
class Problem:
    """``name`` (read in ``use``) does not exist there: ``why``, found by the check ``how``."""

    use: Use
    name: str
    why: str
    how: str

    def __str__(self) -> str:
        return f"{self.use}: {self.why} [{self.how}]"


@dataclass
class Report:
    problems: list[Problem]  # names that do not exist where they are used
    deprecated: dict[str, list[Use]]  # "Owner.name" -> its uses on the path
    checked: dict[str, str]  # each resolved name -> the check that applied


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


class _Checker:
    """Check each use against one release; fills a :class:`Report`."""

    def __init__(self, api: Api, ours: set[str]):
        self.api, self.ours, self.report = api, ours, Report([], {}, {})
        self.as_member = f"member [{api.release.fixture}]"
        self.as_module = f"module name [{api.release.fixture}]"

    def use(self, use: Use) -> None:
        names = [n for n in use.chain if not _dunder(n)]
        if not names:  # trt.__version__
            return
        if use.root == "trt":
            self._module_chain(use)
        else:
            self._object_attribute(use)
        if self.api.binary is not None:
            for name in names:
                if name not in self.api.binary and name not in self.api.python and not self._ours(use, name):
                    self._problem(use, name, f"{name!r} is not in tensorrt.so",
                                  f"name in binary [{self.api.binary.requirement}]")

    def _module_chain(self, use: Use) -> None:
        """``trt.A.B``: A a module name, B a member of A (``trt.ILogger.Severity.ERROR``: nested enums)."""
        owner = use.chain[0]
        if owner not in self.api.module:
            self._problem(use, owner, f"no module name {owner!r}", self.as_module)
            return
        self._resolved(use, owner, self.as_module)
        for name in use.chain[1:]:
            nested = f"{owner}.{name}"
            if nested in self.api.enums or nested in self.api.classes:
                owner = nested
                self._resolved(use, nested, self.as_member)
                continue
            if not _dunder(name):
                self._member(use, owner, name)
            return

    def _object_attribute(self, use: Use) -> None:
        """``config.set_flag``: a member of the variable's class (``TRT_CLASSES``) in this release."""
        owner, name = TRT_CLASSES[use.root], use.chain[0]
        if _dunder(name):
            return
        if owner in self.api.classes:
            self._member(use, owner, name)
        elif not self.api.anywhere(name):  # the release has no such class: the name must exist somewhere
            self._problem(use, name, f"no name {name!r} at all", f"any name [{self.api.release.fixture}]")

    def _member(self, use: Use, owner: str, name: str) -> None:
        found = self.api.member(owner, name)
        if found:
            self._resolved(use, found, self.as_member)
        elif not self._ours(use, name):
            self._problem(use, name, f"{name!r} is not a member of {owner}", self.as_member)

    def _ours(self, use: Use, name: str) -> bool:
        return use.root == "builder" and name in self.ours  # builder.major on our EngineBuilder

    def _problem(self, use: Use, name: str, why: str, how: str) -> None:
        self.report.problems.append(Problem(use, name, f"{why} in TensorRT {self.api.label}", how))

    def _resolved(self, use: Use, qualified: str, how: str) -> None:
        self.report.checked[qualified] = how
        deprecation = self.api.deprecated.get(qualified)
        if deprecation and (use.store or not deprecation.startswith("setter")):  # reading ITensor.dtype is fine
            self.report.deprecated.setdefault(qualified, []).append(use)


def check(source: str, label: str, *, with_binary: bool = True) -> Report:
    """Every TensorRT name ``source`` uses on release ``label``'s path, checked against that release."""
    api = api_for(label, with_binary=with_binary)
    checker = _Checker(api, own_names(source))
    for use in sorted(uses_on_path(source, api), key=lambda u: (u.line, u.root, u.chain)):
        checker.use(use)
    return checker.report


def _format(report: Report) -> str:
    return "\n".join(map(str, report.problems))


def _unallowed(report: Report, label: str) -> dict[str, list[str]]:
    return {name: [str(u) for u in uses] for name, uses in report.deprecated.items()
            if (label, name) not in ALLOWED_DEPRECATED}


# ---------------------------------------------------------------------------------------------------------------
# the tests


WHEELS = [label for label, release in RELEASES.items() if release.wheel]


@pytest.mark.parametrize("label", list(RELEASES))
def test_every_name_our_path_uses_exists_where_it_is_used(label):
    report = check(SOURCE.read_text(), label, with_binary=False)
    assert {"IExecutionContext.execute_async_v3", "Builder.build_serialized_network", "OnnxParser",
            "IBuilderConfig.set_memory_pool_limit"} <= set(report.checked), "the path was not read"
    assert ("NetworkDefinitionCreationFlag.EXPLICIT_BATCH" in report.checked) == (label in ("8.5", "8.6"))
    assert not report.problems, f"guard these by version in {SOURCE.name}:\n{_format(report)}"


@pytest.mark.parametrize("label", WHEELS)
def test_every_name_our_path_uses_is_in_the_shipped_binary(label):
    report = check(SOURCE.read_text(), label)
    assert not report.problems, f"guard these by version in {SOURCE.name}:\n{_format(report)}"


@pytest.mark.parametrize("label", list(RELEASES))
def test_our_path_uses_nothing_deprecated_unless_allowed(label):
    report = check(SOURCE.read_text(), label, with_binary=False)
    unallowed = _unallowed(report, label)
    assert not unallowed, (f"TensorRT {label} deprecates what {SOURCE.name} uses: {unallowed}; move off them, or "
                           "add them to ALLOWED_DEPRECATED with the reason")


def test_the_allow_list_names_deprecated_names(monkeypatch):
    for (label, name), reason in ALLOWED_DEPRECATED.items():
        assert name in api_for(label, with_binary=False).deprecated and reason, (label, name)
    # an allowed name stops being reported, on that release only
    monkeypatch.setitem(ALLOWED_DEPRECATED, ("10.16", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"), "a test")
    assert set(_unallowed(check(WRONG, "10.16", with_binary=False), "10.16")) == {"ITensor.dtype"}
    assert set(_unallowed(check(WRONG, "10.3", with_binary=False), "10.3")) == {
        "NetworkDefinitionCreationFlag.EXPLICIT_BATCH"}


# One snippet with a deliberate mistake per line, checked on every version: which must be reported where.
WRONG = '''\
def build(trt, builder, config, context, t, stream):
    config.set_flag(trt.BuilderFlag.NOT_A_FLAG)                           # no such flag anywhere
    config.set_flag(trt.BuilderFlag.WORKSPACE)                            # a MemoryPoolType value, not a flag
    config.execute_async_v3(stream)                                       # IExecutionContext's, not the config's
    config.progress_monitor = trt.IProgressMonitor()                      # 10 and later
    plan = builder.build_engine(None, config)                             # deprecated in 8.x, gone in 10
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)    # deprecated in 10, gone in 11
    t.dtype = trt.float16                                                 # setting it: deprecated in 10.12
    return trt.Logger.WARNING, trt.ILogger.Severity.ERROR, context.set_input_shape, t.dtype   # reading is fine
'''
EXPECTED_WRONG = {  # release -> (names reported missing or misplaced, names reported deprecated)
    "8.5": ({"NOT_A_FLAG", "WORKSPACE", "execute_async_v3", "IProgressMonitor", "progress_monitor"},
            {"Builder.build_engine"}),
    "8.6": ({"NOT_A_FLAG", "WORKSPACE", "execute_async_v3", "IProgressMonitor", "progress_monitor"},
            {"Builder.build_engine"}),
    "10.3": ({"NOT_A_FLAG", "WORKSPACE", "execute_async_v3", "build_engine"},
             {"NetworkDefinitionCreationFlag.EXPLICIT_BATCH"}),
    "10.16": ({"NOT_A_FLAG", "WORKSPACE", "execute_async_v3", "build_engine"},
              {"NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "ITensor.dtype"}),
    "11.4": ({"NOT_A_FLAG", "WORKSPACE", "execute_async_v3", "build_engine", "EXPLICIT_BATCH"}, set()),
}


def _reported_names(report: Report) -> set[str]:
    return {p.name for p in report.problems}


@pytest.mark.parametrize("label", list(RELEASES))
def test_deliberately_wrong_names_are_reported(label):
    missing, deprecated = EXPECTED_WRONG[label]
    offline = check(WRONG, label, with_binary=False)  # the fixture alone: membership and deprecation
    assert _reported_names(offline) == missing, _format(offline)
    assert set(offline.deprecated) == deprecated
    assert all(u.store for u in offline.deprecated.get("ITensor.dtype", [])), "reading t.dtype is not deprecated"
    assert offline.checked["BuilderFlag"] == f"module name [{RELEASES[label].fixture}]"
    assert offline.checked["ILogger.WARNING"] == f"member [{RELEASES[label].fixture}]"  # Logger's base


@pytest.mark.parametrize("label", WHEELS)
def test_the_binary_check_reports_what_no_binary_has(label):
    """NOT_A_FLAG is in no tensorrt.so; WORKSPACE and execute_async_v3 are (elsewhere): only membership finds
    those."""
    report = check(WRONG, label)
    in_binary = {p.name for p in report.problems if p.how.startswith("name in binary")}
    assert "NOT_A_FLAG" in in_binary and not {"WORKSPACE", "execute_async_v3"} & in_binary, _format(report)
    assert _reported_names(report) == EXPECTED_WRONG[label][0]


@pytest.mark.parametrize("label", list(RELEASES))
def test_version_branches_are_resolved(label):
    snippet = '''\
class B:
    def build(self, builder, config):
        trt = self.trt
        if self.version < (8, 6):
            config.set_flag(trt.BuilderFlag.a85)
        elif self.version >= (10, 12) and config is not None:
            config.set_flag(trt.BuilderFlag.b1012)
        elif builder.major == 10 or self.version == (8, 6):
            config.set_flag(trt.BuilderFlag.c86_or_10)
        else:
            return trt.BuilderFlag.z11_without_config
        flag = trt.BuilderFlag.d_not11 if not self.major >= 11 else trt.BuilderFlag.e11
        if not hasattr(trt, "IProgressMonitor"):
            raise RuntimeError("8.x")
        config.progress_monitor = trt.BuilderFlag.f_has_monitor
'''
    names = {u.chain[-1] for u in uses_on_path(snippet, api_for(label, with_binary=False)) if u.root == "trt"}
    expected = {"8.5": {"a85", "d_not11"}, "8.6": {"c86_or_10", "d_not11"},
                "10.3": {"c86_or_10", "d_not11", "f_has_monitor"},
                "10.16": {"b1012", "c86_or_10", "d_not11", "f_has_monitor"},
                "11.4": {"b1012", "z11_without_config", "e11", "f_has_monitor"}}
    assert names - {"BuilderFlag"} == expected[label]


def test_comparing_a_version_tuple_with_an_int_is_an_error():
    with pytest.raises(TypeError, match="tuple with an int"):
        uses_on_path("def f(self, trt):\n    if self.version >= 10:\n        return trt.X\n",
                     api_for("10.16", with_binary=False))


@pytest.mark.parametrize("label", WHEELS)
def test_the_fixtures_describe_the_shipped_binaries(label):
    """Every class, member and enum value of the fixture is a string of that release's tensorrt.so."""
    api = api_for(label)
    names = set(api.classes) | set(api.enums) | {n for v in (*api.classes.values(), *api.enums.values()) for n in v}
    absent = sorted(n for n in {n.rpartition(".")[2] for n in names} if n not in api.binary)
    assert not absent, f"{api.source} names not in {api.binary.requirement}: {absent[:20]}"
    assert ("IProgressMonitor" in api.binary) == (label != "8.6")  # hence the hasattr guard


def test_the_extractor_reads_binding_chains(tmp_path):
    """extract_tensorrt_api.py on a made-up binding file: classes, enums, bases, deprecations, #if branches."""
    spec = importlib.util.spec_from_file_location("extract_tensorrt_api", FIXTURES / "extract_tensorrt_api.py")
    extractor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extractor)
    (tmp_path / "python" / "src" / "infer").mkdir(parents=True)
    (tmp_path / "python" / "docstrings").mkdir(parents=True)
    (tmp_path / "python" / "docstrings" / "doc.h").write_text(
        'namespace tensorrt {\nnamespace ColorDoc {\nconstexpr char const* descr = R"trtdoc(Colors.)trtdoc";\n'
        'constexpr char const* RED = R"trtdoc(Red.\n    [DEPRECATED] Deprecated in TensorRT 9.9. Use BLUE.)trtdoc";\n'
        'constexpr char const* BLUE = R"trtdoc(Not [DEPRECATED] here: mid-line.)trtdoc";\n}\n'
        'namespace PaintDoc {\nconstexpr char const* descr = R"trtdoc(Paint.\n'
        '    :ivar old_size: [DEPRECATED] Deprecated in TensorRT 9.1.)trtdoc";\n}\n}\n')
    (tmp_path / "python" / "src" / "infer" / "pyPaint.cpp").write_text('''
void bindPaint(py::module& m) {
    py::enum_<Color>(m, "Color", ColorDoc::descr)
        .value("RED", Color::kRED, ColorDoc::RED)   // a comment with .value("GREEN"
        .value("BLUE", Color::kBLUE, ColorDoc::BLUE);
    py::class_<IBase>(m, "IBase").def("base_method", &IBase::f, "x"_a);
    py::class_<IPaint, IBase, std::unique_ptr<IPaint, py::nodelete>> paint{m, "IPaint", PaintDoc::descr};
    paint.def(py::init<>()).def_property("old_size", &IPaint::size, &IPaint::setSize)
        .def_property("width", &IPaint::width, utils::deprecateMember(&IPaint::setWidth, "Deprecated in TensorRT 9.2"))
        .def("paint", utils::deprecateMember(&IPaint::paint, "Deprecated in TensorRT 9.0. Use fill"), "c"_a)
        .def("fill", utils::deprecateInTrtRtxOnly(&IPaint::fill, "only in TensorRT-RTX"));
    py::enum_<IPaint::Mode>(paint, "Mode").value("FAST", IPaint::kFAST).export_values();
#if EXPORT_ALL_BINDINGS
    m.def("full_only", &fullOnly);
#else
    m.def("lean_only", &leanOnly);
#endif
}
''')
    body, files = extractor.extract(tmp_path)
    assert files == ["python/src/infer/pyPaint.cpp", "python/docstrings/**/*.h"]
    assert body["enums"] == {"Color": ["RED", "BLUE"], "IPaint.Mode": ["FAST"]}
    assert body["classes"] == {"IBase": ["base_method"],
                               "IPaint": ["FAST", "Mode", "__init__", "fill", "old_size", "paint", "width"]}
    assert body["bases"] == {"IPaint": ["IBase"]} and body["functions"] == ["full_only"]
    assert body["deprecated"] == {"Color.RED": "since 9.9", "IPaint.old_size": "since 9.1",
                                  "IPaint.paint": "since 9.0", "IPaint.width": "setter since 9.2"}


def test_build_engine_without_tensorrt_says_how_to_get_it(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from conftest import error_line, run_cli

    onnx_file = tmp_path / "m.onnx"
    import torch

    from optimize.export import export_onnx

    export_onnx(torch.nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 16, 16), onnx_file)
    proc = run_cli("-q", "build-engine", "--onnx", onnx_file, "--backend", "tensorrt", "--out", tmp_path / "m.engine")
    assert proc.returncode == 2 and "pip install" in error_line(proc) and "tensorrt" in error_line(proc)
    assert "--backend onnxruntime" in error_line(proc) and not (tmp_path / "m.engine").exists()

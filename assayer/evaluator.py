"""Evaluator references: ``path/to/file.py:fn``, ``package.module:fn`` or ``package.module.fn``."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import EvaluatorError


@dataclass
class EvalContext:
    """What an evaluator taking a second argument receives.

    Set ``ctx.step`` to report the checkpoint's training step when its name does not tell it
    (or return it as a ``_step`` metric).
    """

    watch: str
    checkpoint: str
    step: int | None
    attempt: int
    job_id: str
    version: str
    layout: str = "file"
    """``file``, or the layout of a directory checkpoint (``hf``, ``dcp``, ``deepspeed``, ...)."""
    original_path: str | None = None
    """Where the trainer wrote the checkpoint, when ``checkpoint`` is a snapshot of it (``--snapshot``)."""


@dataclass(frozen=True)
class EvaluatorRef:
    file: str | None  # absolute path of a .py file, or None for a module reference
    module: str | None
    func: str

    def __str__(self) -> str:
        return f"{self.file}:{self.func}" if self.file else f"{self.module}:{self.func}"


def parse_ref(ref: str, base_dir: str | None = None) -> EvaluatorRef:
    """Split ``ref`` into file/module and function; a file path is made absolute against ``base_dir``."""
    ref = ref.strip()
    hint = "give path/to/file.py:function or package.module.function"
    if not ref:
        raise EvaluatorError("the evaluator reference is empty", hint)
    if ref.endswith(".py"):
        raise EvaluatorError(f"evaluator {ref!r} names no function", hint)
    if ":" in ref:
        target, _, func = ref.rpartition(":")
    else:
        target, _, func = ref.rpartition(".")
        if target.endswith(".py") or not target:
            raise EvaluatorError(f"evaluator {ref!r} names no function", hint)
    if not func.isidentifier():
        raise EvaluatorError(f"{func!r} in evaluator {ref!r} is not a function name", hint)
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(target)))
        return EvaluatorRef(file=path, module=None, func=func)
    return EvaluatorRef(file=None, module=target, func=func)


def check_allowed(ref: EvaluatorRef | str, roots: tuple[str, ...] | list[str]) -> None:
    """Refuse an evaluator outside ``roots`` (ASSAYER_EVALUATOR_PATHS); no roots means any evaluator.

    A root that is a path (starts with ``/``, ``.`` or ``~``) admits the ``.py`` files below it,
    links resolved; any other root is a module prefix (``mylab.evals`` admits ``mylab.evals.lm:run``).
    Anyone who can write to Redis can name an evaluator, so workers check this again before running one.
    """
    if not roots:
        return
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    dirs = [os.path.realpath(os.path.expanduser(r)) for r in roots if r.startswith(("/", ".", "~"))]
    prefixes = [r for r in roots if not r.startswith(("/", ".", "~"))]
    if parsed.file:
        real = os.path.realpath(parsed.file)
        if any(real == d or real.startswith(d.rstrip("/") + "/") for d in dirs):
            return
    elif parsed.module and any(parsed.module == m or parsed.module.startswith(m + ".") for m in prefixes):
        return
    raise EvaluatorError(
        f"evaluator {parsed} is outside the allowed evaluator roots ({', '.join(roots)})",
        "put it under one of them, or add its directory (or module prefix) to ASSAYER_EVALUATOR_PATHS",
    )


def is_allowed(ref: str, roots: tuple[str, ...] | list[str]) -> bool:
    try:
        check_allowed(ref, roots)
    except EvaluatorError:
        return False
    return True


class _FromSource(importlib.machinery.SourceFileLoader):
    """Compiles the evaluator's module from its source at every import, never from a cached ``.pyc``.

    Python trusts a ``.pyc`` whose source has the same size and the same mtime in whole seconds. An
    evaluator rewritten within the second of its last import, to the same size (a version tag or a
    constant changed), would run its old code under the new version Assayer hashed from the source.
    """

    def get_code(self, fullname: str) -> Any:
        return self.source_to_code(self.get_data(self.path), self.path)


def _exec_from_source(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path, loader=_FromSource(name, path))
    if spec is None or spec.loader is None:
        raise EvaluatorError(f"cannot import {path} as Python", "the evaluator must be a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise EvaluatorError(
            f"evaluator file {path} does not exist",
            "check the path; in containers it must be a path inside the container (e.g. /evaluators/...)",
        )
    name = "assayer_evaluator_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    # The evaluator's own directory comes first so it can import its sibling modules.
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return _exec_from_source(name, path)


def _import_module(name: str) -> ModuleType:
    """``importlib.import_module``, but the named module itself (the file its version is hashed from) is
    compiled from its source (see :class:`_FromSource`); its packages and what it imports load as usual."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)  # imports the parent packages
    if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader) or not spec.origin:
        return importlib.import_module(name)  # a compiled extension, a namespace or a zip: as Python does
    return _exec_from_source(name, spec.origin)


def load(ref: EvaluatorRef | str) -> Callable[..., Any]:
    """Import the evaluator and return the callable. Errors in the user's module propagate as they are."""
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    if parsed.file:
        module = _import_file(parsed.file)
    else:
        assert parsed.module is not None
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = _import_module(parsed.module)
        except ModuleNotFoundError as exc:
            if exc.name and parsed.module.startswith(exc.name):
                raise EvaluatorError(
                    f"module {parsed.module!r} of evaluator {parsed} cannot be found",
                    "install it, run from the directory that holds it, or give path/to/file.py:function",
                ) from None
            raise
    fn = getattr(module, parsed.func, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise EvaluatorError(
            f"{parsed.file or parsed.module} has no function {parsed.func!r}",
            f"callables defined there: {', '.join(public) or 'none'}",
        )
    if not callable(fn):
        raise EvaluatorError(f"{parsed} is not callable", "point --evaluator at a function")
    return fn  # type: ignore[no-any-return]


def takes_context(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` can be called as ``fn(path, ctx)``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())
    return varargs or len(params) >= 2


def validate(ref: str, base_dir: str | None = None) -> str:
    """Import ``ref`` in this process and check its signature; return the normalised reference."""
    parsed = parse_ref(ref, base_dir)
    try:
        fn = load(parsed)
    except EvaluatorError:
        raise
    except BaseException as exc:  # the user's module failed at import time
        raise EvaluatorError(
            f"evaluator {parsed} failed to import: {type(exc).__name__}: {exc}",
            "run `python -c 'import ...'` on it to see the full traceback, fix it, then add the watch again",
        ) from None
    try:
        sig = inspect.signature(fn)
        required = [
            p
            for p in sig.parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = []
    if len(required) > 2:
        raise EvaluatorError(
            f"evaluator {parsed} needs {len(required)} arguments",
            "it is called as fn(checkpoint_path) or fn(checkpoint_path, ctx)",
        )
    if not takes_context(fn) and len(list(inspect.signature(fn).parameters)) == 0:
        raise EvaluatorError(f"evaluator {parsed} takes no argument", "it is called as fn(checkpoint_path)")
    return str(parsed)


# -- versions ----------------------------------------------------------------------------------

_VERSIONS: dict[tuple[str, str], tuple[tuple[int, int, int], str]] = {}
_PARSE = threading.Lock()
"""One ``ast.parse`` at a time per process. CPython keeps the AST constructor's recursion depth in
shared state, so two threads parsing at once can fail with "SystemError: AST constructor recursion
depth mismatch" (python/cpython#106905); the ledger asks from threads too (the dashboard's
re-evaluate action, under a threaded server)."""

UNKNOWN_VERSION = "unknown"
"""The version of an evaluator whose source this process cannot read (not mounted beside a watch
worker, say). It matches any version: it never starts a backfill nor replaces a queued job."""


def source_file(ref: EvaluatorRef | str) -> str | None:
    """The ``.py`` file that defines the evaluator, found without running it (None when it cannot be found)."""
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    if parsed.file:
        return parsed.file
    assert parsed.module is not None
    try:
        spec = importlib.util.find_spec(parsed.module)  # imports parent packages only, never the module itself
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    return origin if origin and origin.endswith(".py") else None


def version_of(ref: EvaluatorRef | str) -> str:
    """The evaluator's version: what it declares, else a hash of its source file.

    Declared means ``fn.version = "..."`` or ``__version__ = "..."`` in its module, read from the
    source without importing it (a watch worker never imports an evaluator). Cached per file by
    its inode, size and mtime, so asking every scan costs one stat.
    """
    parsed = parse_ref(ref) if isinstance(ref, str) else ref
    path = source_file(parsed)
    if path is None:
        return UNKNOWN_VERSION
    try:
        st = os.stat(path)
    except OSError:
        return UNKNOWN_VERSION
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _VERSIONS.get((path, parsed.func))
    if cached is not None and cached[0] == sig:
        return cached[1]
    try:
        with open(path, "rb") as fh:
            source = fh.read()
    except OSError:
        return UNKNOWN_VERSION
    version = _declared(source, parsed.func) or "src-" + hashlib.sha256(source).hexdigest()[:12]
    _VERSIONS[(path, parsed.func)] = (sig, version)
    return version


def _declared(source: bytes, func: str) -> str | None:
    """A module-level ``func.version = "x"`` wins over the module's ``__version__ = "x"``."""
    try:
        with _PARSE:
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    module_version = fn_version = None
    for node in tree.body:  # the last assignment wins, as when the module runs
        if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Constant):
            continue
        value = node.value.value
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            continue
        for target in node.targets:
            if (isinstance(target, ast.Attribute) and target.attr == "version" and isinstance(target.value, ast.Name)
                    and target.value.id == func):
                fn_version = str(value)
            if isinstance(target, ast.Name) and target.id == "__version__":
                module_version = str(value)
    return fn_version or module_version

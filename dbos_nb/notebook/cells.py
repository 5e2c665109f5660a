"""Durable cells: the body of a `%%dbos_workflow` cell run as a workflow with a stable id.

The cell is parsed with `ast`; its last expression (if any) is turned into an assignment so its
value can be recorded, and the whole body is compiled as module code. The workflow function
executes that code in the notebook's namespace, so the cell behaves like an ordinary cell (names
it assigns land in the namespace), while steps it calls are checkpointed by the engine. The
workflow returns the values of the names the cell assigns plus its last expression's value; that
is what comes back, without running anything, when a finished cell is run again.

The workflow takes the hash of the cell's source as its argument, so a re-run can tell whether
the code changed since an unfinished run started.
"""

from __future__ import annotations

import ast
import hashlib
import linecache
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dbos_nb.errors import DbosNbError

logger = logging.getLogger(__name__)

RESULT_NAME = "__dbos_nb_cell_result__"
CELL_PREFIX = "cell:"


@dataclass
class CompiledCell:
    """A cell ready to run as a workflow body."""

    name: str
    source: str
    source_hash: str
    assigned: list[str]
    has_result: bool
    code: Any
    # Only the cell's def, class and import statements: re-run when a finished cell is replayed,
    # since functions, classes and modules are not recorded.
    definitions: Any


def source_hash(source: str) -> str:
    return hashlib.sha256(source.strip().encode()).hexdigest()[:16]


def _targets(node: ast.AST) -> list[str]:
    names: list[str] = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.append(sub.id)
        elif isinstance(sub, ast.Starred) and isinstance(sub.value, ast.Name):
            names.append(sub.value.id)
    return names


def assigned_names(tree: ast.Module) -> list[str]:
    """Names the cell binds at its top level (not inside functions, classes or lambdas)."""
    found: list[str] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.append(stmt.name)
            elif isinstance(stmt, ast.Import | ast.ImportFrom):
                for alias in stmt.names:
                    found.append(alias.asname or alias.name.split(".")[0])
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    found.extend(_targets(target))
            elif isinstance(stmt, ast.AugAssign | ast.AnnAssign):
                found.extend(_targets(stmt.target))
            elif isinstance(stmt, ast.For | ast.AsyncFor):
                found.extend(_targets(stmt.target))
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        found.extend(_targets(item.optional_vars))
                visit(stmt.body)
            elif isinstance(stmt, ast.If | ast.While):
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.Match):
                for case in stmt.cases:
                    for sub in ast.walk(case.pattern):
                        if isinstance(sub, ast.MatchAs | ast.MatchStar) and sub.name:
                            found.append(sub.name)
                        elif isinstance(sub, ast.MatchMapping) and sub.rest:
                            found.append(sub.rest)
                    visit(case.body)
            elif isinstance(stmt, ast.Try | ast.TryStar):
                visit(stmt.body)
                for handler in stmt.handlers:
                    if handler.name:
                        found.append(handler.name)
                    visit(handler.body)
                visit(stmt.orelse)
                visit(stmt.finalbody)
            # Walrus assignments in expressions bind at the top level too.
            for sub in ast.walk(stmt):
                if isinstance(sub, ast.NamedExpr) and isinstance(sub.target, ast.Name):
                    found.append(sub.target.id)
        return None

    visit(tree.body)
    seen: set[str] = set()
    return [n for n in found if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]


def compile_cell(name: str, source: str) -> CompiledCell:
    """Parse and compile a cell; raises DbosNbError for a syntax error."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise DbosNbError(f"cell {name!r} has a syntax error: {exc}") from exc
    assigned = assigned_names(tree)
    has_result = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    if has_result:
        last = tree.body[-1]
        assert isinstance(last, ast.Expr)
        tree.body[-1] = ast.copy_location(
            ast.Assign(targets=[ast.Name(id=RESULT_NAME, ctx=ast.Store())], value=last.value),
            last,
        )
        ast.fix_missing_locations(tree)
    filename = f"<dbos_workflow {name}>"
    # As IPython does for its cells: the source of what the cell defines can then be read
    # (`inspect.getsource`), which is what a function's version is a hash of.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        code = compile(tree, filename, "exec")
    except SyntaxError as exc:
        # ast.parse accepts some code that compile() refuses, e.g. a top-level `await`.
        hint = " (top-level await cannot run in a durable cell)" if "await" in str(exc) else ""
        raise DbosNbError(f"cell {name!r} cannot be compiled: {exc}{hint}") from exc
    defs = ast.Module(body=[s for s in tree.body if _defines_only(s)], type_ignores=[])
    definitions = compile(defs, f"<dbos_workflow {name} definitions>", "exec")
    return CompiledCell(name, source, source_hash(source), assigned, has_result, code, definitions)


_DEFINITION = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Import | ast.ImportFrom


def _defines_only(stmt: ast.stmt) -> bool:
    """A def, class or import; or a `try` made of nothing else (`try: import orjson as json`
    / `except ImportError: import json`), which runs again as safely as a lone import."""
    if isinstance(stmt, _DEFINITION):
        return True
    if isinstance(stmt, ast.Try | ast.TryStar):
        parts = [*stmt.body, *stmt.orelse, *stmt.finalbody]
        parts += [s for handler in stmt.handlers for s in handler.body]
        return all(isinstance(s, ast.Pass) or _defines_only(s) for s in parts)
    return False


def restore(cell: CompiledCell, recorded: dict[str, Any], namespace: dict[str, Any]) -> Any:
    """Put a finished run's recorded names back in the namespace; returns its last value.

    Names that were not recorded (functions, modules, values that cannot be serialized) come
    back only from the cell's top-level definitions; the others are named in a note, since
    running the rest of the cell again to get them is what replay must not do."""
    namespace.update(recorded.get("names", {}))
    exec(cell.definitions, namespace)
    missing = [name for name in recorded.get("skipped", []) if name not in namespace]
    if missing:
        print(
            f"note: not restored (not recorded, and not defined at the cell's top level): "
            f"{', '.join(missing)}. Define them in an ordinary cell, or run this one with "
            "--rerun."
        )
    return recorded.get("result")


def make_body(cell: CompiledCell, namespace: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """The workflow function: run the cell in `namespace` and return what it produced."""

    def cell_body(source_hash: str) -> dict[str, Any]:
        namespace.pop(RESULT_NAME, None)
        exec(cell.code, namespace)
        result = namespace.pop(RESULT_NAME, None)
        names: dict[str, Any] = {}
        skipped: list[str] = []
        for var in cell.assigned:
            if var not in namespace:
                continue
            value = namespace[var]
            if _storable(value):
                names[var] = value
            else:
                skipped.append(var)
        return {
            "names": names,
            "result": result if _storable(result) else None,
            "skipped": skipped,
            "source_hash": source_hash,
        }

    cell_body.__name__ = cell_body.__qualname__ = f"{CELL_PREFIX}{cell.name}"
    return cell_body


def _storable(value: Any) -> bool:
    # Modules, functions and other values that cannot be pickled stay in the kernel only.
    if callable(value) or type(value).__name__ == "module":
        return False
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        try:
            import cloudpickle

            cloudpickle.dumps(value)
        except Exception:
            return False
    return True

"""Durable cells: the body of a `%%dbos_workflow` cell run as a workflow with a stable id.

The cell is parsed with `ast`; its last expression (if any) is turned into an assignment so its
value can be recorded, and the whole body is compiled as module code. The workflow function
executes that code in the notebook's namespace, so the cell behaves like an ordinary cell (names
it assigns land in the namespace), while steps it calls are checkpointed by the engine. The
workflow returns the values of the names the cell assigns plus its last expression's value; that
is what comes back, without running anything, when a finished cell is run again.

Objects the cell changes in place come back too, as their state after the cell: those the AST
shows changed (`df["x"] = ...`, `obj.attr = ...`, `del d[k]`, `df.loc[i] += 1`), and those
that existed before the cell and were changed by a method call on them or by a function they
were passed to at the cell's top level (`items.append(x)`, `df.insert(0, "id", ids)`,
`random.shuffle(items)`), which is told by comparing a digest of their pickled state before and
after the cell. Changes made out of the AST's sight (inside a function, to a name the cell does
not mention, or through another name) are not recorded.

The workflow takes the hash of the cell's source as its argument, so a re-run can tell whether
the code changed since an unfinished run started.
"""

from __future__ import annotations

import ast
import hashlib
import linecache
import logging
import pickle
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbos_nb.core import versions
from dbos_nb.core.context import current
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
    # Names whose objects the cell changes in place where the AST sees it (`df["x"] = ...`).
    changed: list[str] = field(default_factory=list)
    # Names the cell calls a method of or passes to a function: recorded when the call changed
    # an object that existed before the cell.
    watched: list[str] = field(default_factory=list)
    # Names the definitions bind: brought back by running them again, so not "lost" when they
    # cannot be recorded.
    defined: frozenset[str] = frozenset()
    # Names a definition binds that the rest of the cell binds again: a replay's definitions
    # must not put the plain definition in their place.
    rebound: frozenset[str] = frozenset()


def source_hash(source: str) -> str:
    return hashlib.sha256(source.strip().encode()).hexdigest()[:16]


def _base_name(node: ast.expr) -> str | None:
    """`df` of `df["x"]`, `df.loc[i, "x"]` or `a.b[c].d`: the name whose object is reached
    (None when the chain starts elsewhere, as in `f().x`)."""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _targets(node: ast.AST, changed: list[str] | None = None) -> list[str]:
    """The plain names an assignment target binds; the base names of its subscript and
    attribute parts (`df["x"]`, `obj.attr`), whose objects it changes in place, go to
    `changed`."""
    names: list[str] = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.append(sub.id)
        elif isinstance(sub, ast.Starred) and isinstance(sub.value, ast.Name):
            names.append(sub.value.id)
        elif (
            changed is not None
            and isinstance(sub, ast.Attribute | ast.Subscript)
            and isinstance(sub.ctx, ast.Store | ast.Del)
        ):
            base = _base_name(sub)
            if base is not None:
                changed.append(base)
    return names


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def assigned_names(tree: ast.Module) -> list[str]:
    """Names the cell binds at its top level (not inside functions, classes or lambdas)."""
    return _bindings(tree)[0]


def changed_names(tree: ast.Module) -> list[str]:
    """Base names of the subscripts and attributes the cell assigns, augments or deletes at its
    top level (`df["x"] = ...`, `df.loc[i] += 1`, `obj.attr = ...`, `del d[k]`): their objects
    change in place."""
    return _bindings(tree)[1]


def _bindings(tree: ast.Module) -> tuple[list[str], list[str]]:
    found: list[str] = []
    changed: list[str] = []

    def visit(stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found.append(stmt.name)
            elif isinstance(stmt, ast.Import | ast.ImportFrom):
                for alias in stmt.names:
                    found.append(alias.asname or alias.name.split(".")[0])
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    found.extend(_targets(target, changed))
            elif isinstance(stmt, ast.AugAssign | ast.AnnAssign):
                found.extend(_targets(stmt.target, changed))
            elif isinstance(stmt, ast.Delete):
                # `del x` unbinds (nothing to record); `del df["x"]` changes df.
                for target in stmt.targets:
                    _targets(target, changed)
            elif isinstance(stmt, ast.For | ast.AsyncFor):
                found.extend(_targets(stmt.target, changed))
                visit(stmt.body)
                visit(stmt.orelse)
            elif isinstance(stmt, ast.With | ast.AsyncWith):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        found.extend(_targets(item.optional_vars, changed))
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
    return _unique(found), _unique(changed)


_SCOPES = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda


def watched_names(tree: ast.Module) -> list[str]:
    """Names whose objects a call made for its effect may change out of the AST's sight: in a
    call that is a statement of its own (its value unused: `items.append(x)`,
    `df.insert(0, "id", ids)`, `model.fit(X, y)`, `random.shuffle(items)`), the base of the
    method called and the plain names passed. A call whose value is used (`n = len(df)`,
    `y = model.predict(X)`) is taken to read, which spares pickling every object it is given.
    Bodies of functions, classes and lambdas are left out: they run, if at all, when called."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, _SCOPES):
                continue
            if isinstance(child, ast.Expr):
                call = child.value.value if isinstance(child.value, ast.Await) else child.value
                if isinstance(call, ast.Call):
                    _watch_call(call, found)
            visit(child)

    visit(tree)
    return _unique(found)


def _watch_call(call: ast.Call, found: list[str]) -> None:
    if isinstance(call.func, ast.Attribute):
        base = _base_name(call.func)
        if base is not None:
            found.append(base)
    for arg in [*call.args, *(kw.value for kw in call.keywords)]:
        if isinstance(arg, ast.Starred):
            arg = arg.value
        if isinstance(arg, ast.Name):
            found.append(arg.id)


def compile_cell(name: str, source: str) -> CompiledCell:
    """Parse and compile a cell; raises DbosNbError for a syntax error."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        line = source.splitlines()[exc.lineno - 1].lstrip() if exc.lineno else ""
        if line.startswith(("%", "!")):
            # IPython's own syntax: the cell body is run as plain Python, as the workflow.
            raise DbosNbError(
                f"cell {name!r}, line {exc.lineno}: magics and shell commands ({line[:40]!r}) "
                "cannot run in a durable cell, which runs as plain Python; move them to an "
                "ordinary cell"
            ) from exc
        raise DbosNbError(f"cell {name!r} has a syntax error: {exc}") from exc
    assigned, changed = _bindings(tree)
    assigned_set = set(assigned)
    watched = [n for n in watched_names(tree) if n not in assigned_set and n not in changed]
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
    # A name the rest of the cell binds again (`h = lru_cache(h)`) is not what a replay's
    # definitions bring back: it stays among the names a note may list as lost.
    others = ast.Module(body=[s for s in tree.body if not _defines_only(s)], type_ignores=[])
    bound_again = set(_bindings(others)[0])
    definitions_bind = set(_bindings(defs)[0])
    return CompiledCell(
        name,
        source,
        source_hash(source),
        assigned,
        has_result,
        code,
        definitions,
        changed=[n for n in changed if n not in assigned_set],
        watched=watched,
        defined=frozenset(definitions_bind - bound_again),
        rebound=frozenset(definitions_bind & bound_again),
    )


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
    running the rest of the cell again to get them is what replay must not do. So are objects
    the cell changed in place whose new state could not be recorded."""
    namespace.update(recorded.get("names", {}))
    kept = {name: namespace[name] for name in cell.rebound if name in namespace}
    exec(cell.definitions, namespace)
    for name in cell.rebound:
        if name in kept:
            namespace[name] = kept[name]
        else:
            namespace.pop(name, None)  # lost (its rebound value was not recorded): said below
    missing = [name for name in recorded.get("skipped", []) if name not in namespace]
    if missing:
        print(
            "note: not restored (not recorded, and not what the cell's top-level definitions "
            f"bind): "
            f"{', '.join(missing)}. Define them in an ordinary cell, or run this one with "
            "--rerun."
        )
    if recorded.get("result_not_recorded"):
        print(
            "note: the cell's last value was not recorded (it cannot be serialized), so there "
            "is none to show; run the cell with --rerun to compute it again."
        )
    unrecorded = recorded.get("unrecorded_changes", [])
    if unrecorded:
        print(
            f"note: changes this cell made in place to {', '.join(unrecorded)}, if any, are not "
            "restored (modules, functions and values that cannot be serialized are not "
            "recorded); run the cell with --rerun to make them again."
        )
    return recorded.get("result")


def make_body(cell: CompiledCell, namespace: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """The workflow function: run the cell in `namespace` and return what it produced."""

    def cell_body(source_hash: str) -> dict[str, Any]:
        __tracebackhide__ = True  # IPython and pytest leave this frame out of tracebacks
        if source_hash != cell.source_hash:
            # A run is resumed by whatever body is registered under the cell's name, which a
            # later version of the cell (run under another --id, say) may have replaced: it
            # must not finish the old run with new code.
            raise DbosNbError(
                f"the cell {cell.name!r} changed since this run started; resuming it would mix "
                "old and new code. Run the cell with --rerun to start afresh."
            )
        namespace.pop(RESULT_NAME, None)
        # Only objects that exist before the cell can be changed by it in place; the digest of
        # their state tells afterwards whether a call did change them.
        before = {var: _fingerprint(namespace[var]) for var in cell.watched if var in namespace}
        # Data whose state cannot be followed (a connection, a model that is also callable):
        # if the cell changed it, the change does not come back, and the note says so.
        unfollowed = [
            var
            for var, digest in before.items()
            if digest is None and not _not_data(namespace[var])
        ]
        exec(cell.code, namespace)
        result = namespace.pop(RESULT_NAME, None)
        names: dict[str, Any] = {}
        skipped: list[str] = []
        unrecorded: list[str] = list(unfollowed)
        # What the cell bound, then what it changed in place; what cannot be stored is noted.
        for wanted, left_out in ((cell.assigned, skipped), (cell.changed, unrecorded)):
            for var in wanted:
                if var not in namespace:
                    continue
                value = namespace[var]
                if _storable(value):
                    names[var] = value
                elif left_out is unrecorded or var not in cell.defined:
                    left_out.append(var)  # (a definition comes back: it runs again on replay)
        for var, digest in before.items():
            # An object that was read, not changed, is left alone: recording it would cost a
            # copy in the database and, on replay, replace the kernel's object for nothing.
            if digest is not None and var in namespace:
                value = namespace[var]
                if _fingerprint(value) not in (None, digest):
                    names[var] = value
        kept = result is None or _storable(result)
        if not kept:
            # Shown by the run that made it (see `take_live_result`), not recorded.
            _live_results[current().workflow.workflow_id] = result  # type: ignore[union-attr]
        return {
            "names": names,
            "result": result if kept else None,
            "result_not_recorded": not kept,
            "skipped": skipped,
            "unrecorded_changes": unrecorded,
            "source_hash": source_hash,
        }

    cell_body.__name__ = cell_body.__qualname__ = f"{CELL_PREFIX}{cell.name}"
    # Which version of the cell this body runs: part of its version (`versions.source_digest`),
    # and what %dbos_resume compares with a run's own.
    setattr(cell_body, versions.CELL_SOURCE_ATTR, cell.source_hash)
    return cell_body


# The last value of a cell run that cannot be recorded (a Batch, a model, a lock), by workflow
# id: the run that made it shows it; a replay cannot.
_live_results: dict[str, Any] = {}


def take_live_result(workflow_id: str) -> Any:
    """The unrecordable last value of the cell run `workflow_id` made in this kernel, once."""
    return _live_results.pop(workflow_id, None)


def _storable(value: Any) -> bool:
    # Modules, functions and other values that cannot be pickled stay in the kernel only.
    if callable(value) or isinstance(value, types.ModuleType):
        return False
    return _digest(value) is not None


class _HashSink:
    """A file that only hashes what is written to it: a pickle's digest without its bytes."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        # Protocol 5 hands large buffers (a frame's or an array's data) over as PickleBuffers.
        self.hash.update(data)
        return memoryview(data).nbytes


def _digest(value: Any) -> bytes | None:
    """A digest of an object's pickled state (pickle, else cloudpickle), None if it cannot be
    pickled. Streamed into a hash, so a large frame is not copied."""
    for pickler in (pickle.Pickler, _cloudpickler()):
        sink = _HashSink()
        try:
            pickler(sink, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        except Exception:
            continue
        return sink.hash.digest()
    return None


def _cloudpickler() -> Any:
    import cloudpickle

    return cloudpickle.Pickler


def _not_data(value: Any) -> bool:
    """Code and dbos_nb's own objects (queues, batches, handles: views of the database), which
    a cell's replay does not bring back, and need not: it defines them again or reads them."""
    code = types.ModuleType | type | types.FunctionType | types.BuiltinFunctionType
    return (
        isinstance(value, code | types.MethodType)
        or type(value).__module__.split(".")[0] == "dbos_nb"
    )


def _fingerprint(value: Any) -> bytes | None:
    """The digest of a watched object's state, or None for what is not recorded: code,
    dbos_nb's objects, other callables, and values that cannot be pickled."""
    if _not_data(value) or callable(value):
        return None
    return _digest(value)

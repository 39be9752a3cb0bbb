"""Rules 1, 2 and 3 of the style card, checked on the source code.

Rule 1, pure core: the pure modules of ``hvr_common`` import nothing that does
I/O or concurrency (asyncio, aiohttp, aiofiles, socket, sqlite3, subprocess,
threading) and nothing from the daemons or the CLI; no module of
``hvr_common`` at all imports the daemons or the CLI.  Rule 2: no package has
a ``utils``, ``helpers`` or ``misc`` module.  One writer per side: only
``hvr_agent/relationship.py`` calls the store methods that change the
primary's replication record, and only ``hvr_listener/replica_state.py``
writes a replica's replication state.

Imports are read with :mod:`ast`, so nothing is imported or executed and an
import hidden in a function, an ``if`` or an ``importlib.import_module("...")``
call is still seen.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

IO_MODULES = frozenset({"asyncio", "aiohttp", "aiofiles", "socket", "sqlite3", "subprocess", "threading"})
SHELL_PACKAGES = frozenset({"hvr_agent", "hvr_listener", "hvrctl"})
GOD_MODULE_NAMES = frozenset({"utils", "helpers", "misc"})

REPO = Path(__file__).resolve().parents[2]
COMMON = REPO / "hvr_common"
PURE = COMMON / "pure"
# The pure modules of hvr_common (rule 1): the folder says it; a module put there (or in a package
# under it) promises no I/O.  Named by their path under pure/ without ".py" ("wire/routes").
PURE_MODULES = tuple(sorted(str(p.relative_to(PURE).with_suffix("")) for p in PURE.rglob("*.py")
                            if p.stem != "__init__" or p.parent != PURE))
PACKAGES = ("hvr_common", *sorted(SHELL_PACKAGES))


def imported_modules(source: str, module: str) -> set[str]:
    """Every absolute dotted name ``source`` (the module named ``module``) may import.

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (``c`` may be a
    submodule); relative imports are resolved against ``module``'s package;
    ``__import__("x")`` and ``importlib.import_module("x")`` with a literal
    name count as imports of ``x``.
    """
    package = module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if (called in ("__import__", "import_module") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    names.discard("")
    return names


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def forbidden_in_pure(names: set[str]) -> set[str]:
    return {n for n in names if _top(n) in IO_MODULES or _top(n) in SHELL_PACKAGES}


def shell_imports(names: set[str]) -> set[str]:
    return {n for n in names if _top(n) in SHELL_PACKAGES}


def _imports_of(path: Path) -> set[str]:
    module = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return imported_modules(path.read_text(encoding="utf-8"), module)


# --- the checker itself must be able to fail ----------------------------------------
_PLANTED = '''
import struct
import asyncio.subprocess
from socket import socket as sock
from . import hrl
from .errors import HvrError
from hvr_common.pure import nbd_protocol
from hvrctl.main import main
import importlib

def f():
    import sqlite3
    return importlib.import_module("threading"), __import__("aiofiles")

if False:
    from aiohttp import web
    from hvr_listener import anything
'''


def test_the_import_reader_sees_every_kind_of_import():
    names = imported_modules(_PLANTED, "hvr_common.pure.planted")
    assert {"struct", "asyncio.subprocess", "socket", "hvr_common.pure.hrl", "hvr_common.pure.errors",
            "hvr_common.pure.nbd_protocol", "hvrctl.main", "sqlite3", "threading", "aiofiles", "aiohttp",
            "hvr_listener"} <= names
    assert {_top(n) for n in forbidden_in_pure(names)} == {
        "asyncio", "socket", "hvrctl", "sqlite3", "threading", "aiofiles", "aiohttp", "hvr_listener"}
    assert {_top(n) for n in shell_imports(names)} == {"hvrctl", "hvr_listener"}


def test_the_import_reader_passes_a_clean_module():
    names = imported_modules("import struct\nfrom dataclasses import dataclass\nfrom .errors import HvrError\n",
                             "hvr_common.pure.clean")
    assert forbidden_in_pure(names) == set()
    assert "hvr_common.pure.errors" in names


# --- rule 1 -------------------------------------------------------------------------
def test_the_pure_folder_holds_the_core():
    assert {"hrl", "bundle", "nbd_protocol", "replication_state", "errors", "wire/routes",
            "wire/error_catalogue"} <= set(PURE_MODULES)


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_no_io_and_no_shell(module):
    bad = forbidden_in_pure(_imports_of(PURE / f"{module}.py"))
    assert not bad, f"hvr_common/pure/{module}.py is pure but imports {sorted(bad)}"


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_imports_only_pure_hvr_common_modules(module):
    """I/O must not come in through an hvr_common sibling outside pure/ (logs, systemd, sockets...)."""
    names = _imports_of(PURE / f"{module}.py")
    outside = {n for n in names if _top(n) == "hvr_common" and n != "hvr_common.pure"
               and not n.startswith("hvr_common.pure.")}
    assert not outside, f"hvr_common/pure/{module}.py is pure but imports {sorted(outside)}"


@pytest.mark.parametrize("path", sorted(COMMON.rglob("*.py")), ids=lambda p: str(p.relative_to(COMMON)))
def test_hvr_common_never_imports_the_daemons_or_the_cli(path):
    bad = shell_imports(_imports_of(path))
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


# --- rule 2 -------------------------------------------------------------------------
def test_packages_are_where_this_test_looks():
    for package in PACKAGES:
        assert (REPO / package / "__init__.py").is_file(), f"{package} is not a package under {REPO}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_utils_helpers_or_misc_module(package):
    found = [p.relative_to(REPO) for p in (REPO / package).rglob("*")
             if "__pycache__" not in p.parts
             and ((p.is_file() and p.suffix == ".py") or p.is_dir())
             and (p.stem if p.is_file() else p.name) in GOD_MODULE_NAMES]
    assert not found, f"god modules (style rule 2): {[str(p) for p in found]}"


# --- the shared block layer ---------------------------------------------------------
BLOCK = COMMON / "block"
BLOCK_MODULES = tuple(sorted(BLOCK.glob("*.py")))


def test_the_block_layer_is_where_this_test_looks():
    assert {"blockdev", "catalogue", "nbd_server"} <= {p.stem for p in BLOCK_MODULES}


def test_the_hvr_common_wide_check_covers_the_block_layer():
    """The rglob of ``test_hvr_common_never_imports_the_daemons_or_the_cli`` reaches hvr_common/block."""
    assert set(BLOCK_MODULES) <= set(COMMON.rglob("*.py"))


@pytest.mark.parametrize("path", BLOCK_MODULES, ids=lambda p: p.name)
def test_block_layer_does_not_import_the_agent(path):
    """Both daemons serve block devices through it: it must not need the agent to do so."""
    bad = {n for n in _imports_of(path) if _top(n) in ("hvr_agent", "hvr_listener")}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


# --- the listener's replica state has one writer ------------------------------------
# Only hvr_listener/replica_state.py changes a replica's state (and state_detail): it decides
# through the transition table, the store persists.  The store methods that write the state are
# found in the store's SQL, not listed by hand; no other listener module may name them, pass
# state= or state_detail= to update_replica, or carry SQL that writes the state.
LISTENER = REPO / "hvr_listener"
STATE_MODULE = LISTENER / "replica_state.py"
STORE_MODULE = LISTENER / "store.py"
_STATE_SQL = re.compile(r"\bINSERT\s+INTO\s+replicas\b|\bUPDATE\s+replicas\s+SET\s+((?!\bWHERE\b).)*"
                        r"(\bstate(_detail)?\b|\{\})", re.IGNORECASE | re.DOTALL)
_STATE_KEYWORDS = frozenset({"state", "state_detail"})


def _sql_text(node: ast.AST) -> str | None:
    """The text of a string literal; an f-string's replacement fields become ``{}`` (any column)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def writes_state_sql(node: ast.AST) -> bool:
    text = _sql_text(node)
    return text is not None and _STATE_SQL.search(text) is not None


def store_state_writers(store_source: str) -> set[str]:
    """The methods of the store whose SQL writes a replica's state."""
    tree = ast.parse(store_source)
    return {fn.name for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(writes_state_sql(n) for n in ast.walk(fn))}


def state_writes(source: str, writers: set[str], *, sql: bool = True) -> list[str]:
    """Every place in ``source`` that writes a replica's state (``line: what``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in writers:
            found.append(f"{node.lineno}: .{node.attr}")  # a call, or handed to a thread
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in writers:
            found.append(f"{node.lineno}: {node.value!r}")  # getattr(store, "...")
        elif isinstance(node, ast.Call):
            named = {a.attr for a in (node.func, *node.args) if isinstance(a, ast.Attribute)}
            keywords = {k.arg for k in node.keywords} & _STATE_KEYWORDS
            if "update_replica" in named and keywords:
                found.append(f"{node.lineno}: update_replica({', '.join(sorted(keywords))}=...)")
        if sql and writes_state_sql(node):
            found.append(f"{node.lineno}: SQL writing the state")
    return sorted(found, key=lambda f: int(f.split(":")[0]))


_PLANTED_STATE_WRITES = '''
async def fail(store, rep, detail):
    await asyncio.to_thread(store.update_replica, rep.vm_id, state=ReplicationState.ERROR, state_detail=detail)
    store.update_replica(rep.vm_id, state_detail=None)
    store.change_replica_state(rep.vm_id, rep.created_ns, rep.state, ReplicationState.REPLICATING)
    getattr(store, "advance_initial_offset")(rep.vm_id, 0, None, 1, 0, 1, None)
    store._db.execute("UPDATE replicas SET next_sequence=?, state=? WHERE vm_id=?", (1, "Error", rep.vm_id))
    store._db.execute(f"UPDATE replicas SET {cols} WHERE vm_id=?", values)
'''


def test_the_state_writers_are_found_in_the_store_sql():
    assert store_state_writers(STORE_MODULE.read_text(encoding="utf-8")) == {
        "create_replica", "change_replica_state", "advance_initial_offset", "mark_loaded", "rebase_replica",
        "begin_failover", "undo_failover", "finish_failover"}
    assert store_state_writers('def f(db):\n    db.execute("UPDATE replicas SET last_applied_sequence=? '
                               'WHERE vm_id=? AND state=?")\n') == set()


def test_the_state_write_checker_finds_every_planted_write():
    writers = {"create_replica", "change_replica_state", "advance_initial_offset"}
    found = state_writes(_PLANTED_STATE_WRITES, writers)
    assert [f.split(":")[0] for f in found] == ["3", "4", "5", "6", "7", "8"], found


def test_the_state_write_checker_passes_progress_writes():
    clean = ('store.record_cycle(vm_id, 1, 1, digest, 10, path, 0)\n'
             'store.update_replica(vm_id, next_sequence=2)\n'
             'db.execute("UPDATE replicas SET last_applied_sequence=? WHERE vm_id=? AND state=?")\n'
             'status = {"state": rep.state.value, "state_detail": rep.state_detail}\n')
    assert state_writes(clean, {"create_replica", "change_replica_state", "advance_initial_offset"}) == []


@pytest.mark.parametrize("path", sorted(p for p in LISTENER.glob("*.py") if p != STATE_MODULE),
                         ids=lambda p: p.name)
def test_only_the_replica_state_module_writes_replica_state(path):
    writers = store_state_writers(STORE_MODULE.read_text(encoding="utf-8"))
    # the store holds the writers' SQL (their bodies); it must not call them itself
    found = state_writes(path.read_text(encoding="utf-8"), writers, sql=path != STORE_MODULE)
    assert not found, f"{path.relative_to(REPO)} writes replica state outside replica_state.py: {found}"


# --- one writer of the primary's replication state -----------------------------------------
# Only hvr_agent/relationship.py may call the AgentStore methods that change the ``replication``
# table (the relationship record): that is where R4 (the newest record saved last) is kept and
# every state change goes through the transition table.  The methods are found in store.py by
# their SQL, so a new writer is covered without touching this test.
STATE_OWNER = REPO / "hvr_agent" / "relationship.py"
STORE = REPO / "hvr_agent" / "store.py"
_WRITES_REPLICATION = re.compile(r"\b(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+replication\b", re.IGNORECASE)


def replication_writers(store_source: str) -> set[str]:
    """Names of the store's methods whose SQL inserts, updates or deletes rows of ``replication``."""
    writers = set()
    for node in ast.walk(ast.parse(store_source)):
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, ast.FunctionDef) and any(
                        isinstance(c, ast.Constant) and isinstance(c.value, str) and _WRITES_REPLICATION.search(c.value)
                        for c in ast.walk(method)):
                    writers.add(method.name)
    return writers


def uses_of(source: str, names: set[str]) -> set[str]:
    """Which of ``names`` the source reaches for as a method: an attribute, or a string (``getattr``).

    Bare names are not uses: a function of another module may share a method's name (the admin
    API's ``remove_replication`` handler)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in names:
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.add(node.value)
    return found


_PLANTED_STORE = '''
class Store:
    def save_thing(self, rec):
        sets = ", ".join(cols)
        self._db.execute(f"UPDATE replication SET {sets} WHERE vm=?", rec)

    def add_thing(self, rec):
        self._db.execute("insert into replication VALUES (?)", rec)

    def drop_thing(self, vm):
        with self.transaction() as db:
            db.execute("DELETE FROM replication_cycles WHERE vm=?", (vm,))
            db.execute("DELETE FROM replication WHERE vm=?", (vm,))

    def add_stat(self, vm, stat):
        self._db.execute("INSERT INTO replication_cycles VALUES (?)", (vm, stat))

    def list_things(self):
        return self._db.execute("SELECT * FROM replication").fetchall()
'''

_PLANTED_WRITER = '''
async def resume(self, rep):
    rep.rec = rep.rec.replace(state="Replicating")
    await asyncio.to_thread(self.store.save_replication, rep.rec)

def remove(store, name):
    store.remove_replication(name)

def sneaky(store, rec):
    getattr(store, "add_replication")(rec)
'''


def test_the_writer_finder_reads_the_sql():
    assert replication_writers(_PLANTED_STORE) == {"save_thing", "add_thing", "drop_thing"}


def test_the_use_finder_sees_calls_references_and_getattr():
    writers = {"save_replication", "add_replication", "remove_replication"}
    assert uses_of(_PLANTED_WRITER, writers) == writers
    clean = ("async def f(self):\n    await asyncio.to_thread(self.store.add_cycle_stat, 'vm', stat)\n"
             "    self.store.list_replications()\n"
             "async def remove_replication(request):\n    return request\n"
             "app.router.add_delete('/v1/vms/{name}/replication', remove_replication)\n")
    assert uses_of(clean, writers) == set()


def test_the_store_has_the_replication_writers_this_test_guards():
    assert {"save_replication", "add_replication", "remove_replication"} <= replication_writers(
        STORE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted([*(REPO / "hvr_agent").rglob("*.py"), *(REPO / "hvrctl").rglob("*.py")]),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_only_the_relationship_writes_replication_state(path):
    if path in (STATE_OWNER, STORE):
        return
    writers = replication_writers(STORE.read_text(encoding="utf-8"))
    used = uses_of(path.read_text(encoding="utf-8"), writers)
    assert not used, (f"{path.relative_to(REPO)} calls {sorted(used)}: the replication record is written "
                      f"only by hvr_agent/relationship.py (Relationship)")


# --- tests import support code, never another test module ----------------------------
TEST_FILES = sorted((REPO / "tests").rglob("test_*.py"))


def test_the_test_files_are_where_this_test_looks():
    assert len(TEST_FILES) > 20 and (REPO / "tests" / "support" / "daemons.py").is_file()


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_test_module_imports_another(path):
    names = imported_modules(path.read_text(encoding="utf-8"), path.stem)
    bad = {n for n in names if any(part.startswith("test_") for part in n.split("."))}
    assert not bad, f"{path.relative_to(REPO)} imports test modules {sorted(bad)}: move shared code to tests/support"


def test_the_test_import_check_can_fail():
    names = imported_modules("from test_listener_api import SIZE\nimport tests.unit.test_bundle\n", "test_x")
    assert {n for n in names if any(part.startswith("test_") for part in n.split("."))}

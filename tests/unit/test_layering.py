"""Rules 1 and 2 of the style card, checked on the source code.

Rule 1, pure core: the pure modules of ``hvr_common`` import nothing that does
I/O or concurrency (asyncio, aiohttp, aiofiles, socket, sqlite3, subprocess,
threading) and nothing from the daemons or the CLI; no module of
``hvr_common`` at all imports the daemons or the CLI.  Rule 2: no package has
a ``utils``, ``helpers`` or ``misc`` module.  One writer: only
``hvr_agent/relationship.py`` calls the store methods that change the
primary's replication record.

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
# The pure modules of hvr_common (rule 1): the folder says it; a module put there promises no I/O.
PURE_MODULES = tuple(sorted(p.stem for p in PURE.glob("*.py") if p.stem != "__init__"))
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
    assert {"hrl", "bundle", "nbd_protocol", "replication_state", "errors"} <= set(PURE_MODULES)


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

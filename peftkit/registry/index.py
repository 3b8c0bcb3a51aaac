"""The registry's SQLite index (``index.sqlite``, stdlib sqlite3 in WAL mode).

:class:`Index` holds one connection per thread (a forked child opens its own), runs write
transactions (``BEGIN IMMEDIATE``, so writers queue across processes, and every commit
bumps the generation counter), creates the schema or migrates an older index, opens an index
read-only (``mode=ro``, or ``immutable=1`` on a read-only mount), and tells a damaged file
(confirmed with ``PRAGMA quick_check``) from a busy or read-only one. The registry above
it knows nothing of SQLite but the SQL of its own rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from peftkit.errors import ConfigError, RegistryError
from peftkit.registry.aliases import TABLE as ALIAS_TABLE
from peftkit.registry.entries import COLUMNS, MAX_VERSION, Problem
from peftkit.registry.promotions import TABLE as PROMOTION_TABLE

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
BUSY_TIMEOUT_S = 30.0
_SCHEMA = (
    # One counter per name (case-insensitive, as many file systems are): versions are
    # allocated from it, so a removed version number is never handed out again.
    "CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY COLLATE NOCASE,"
    " last_version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS entries (name TEXT NOT NULL, version INTEGER NOT NULL,"
    " method TEXT NOT NULL, task TEXT NOT NULL, labels TEXT NOT NULL,"
    " base_fingerprint TEXT NOT NULL, base TEXT NOT NULL, quantization TEXT, template TEXT,"
    " verbalizer TEXT, metrics TEXT NOT NULL, files TEXT NOT NULL, tags TEXT NOT NULL,"
    " created TEXT NOT NULL, run_id TEXT, PRIMARY KEY (name, version))",
)
# v2: the run id of each entry, and a meta table: this registry's id (what its staging
# markers name) and the generation, bumped by every committed write.
_V2 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_run_id ON entries (run_id)",
)
# v3: aliases (see registry/aliases.py)
_V3 = (ALIAS_TABLE,)
# v4: each entry's lineage and calibration (JSON, nullable), and the promotion decisions
# (see registry/promotions.py)
_V4_COLUMNS = ("lineage", "calibration")
_V4 = (PROMOTION_TABLE,)
_DAMAGE_WORDS = ("malformed", "not a database", "corrupt", "disk image")
INSERT_ROW = f"INSERT INTO entries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Index:
    """The index file of the registry at ``root``: connections, transactions, schema and
    damage. ``read_only`` is set when asked for or when the files cannot be written.

    >>> index = Index(Path("registry"), read_only=False)       # doctest: +SKIP
    >>> index.open()                                            # doctest: +SKIP
    >>> with index.write() as conn:                             # doctest: +SKIP
    ...     conn.execute("UPDATE entries SET tags = '[]'")
    """

    def __init__(self, root: Path, *, read_only: bool) -> None:
        self.root = root
        self.path = root / "index.sqlite"
        self.damage: str | None = None  # why the index cannot be used, once found
        self.owner = ""  # this registry's id (from the index): what its markers name
        self.has_meta = True  # False only for a read-only v1 index
        self.absent: frozenset[str] = frozenset()  # entry columns a read-only old index lacks
        self.read_only = read_only or not writable(root, self.path)
        self._local = threading.local()
        self._checked = False  # quick_check passed before this object's first write

    def open(self) -> None:
        """Check a read-only index, or create / migrate a writable one."""
        if self.read_only:
            self._open_read_only()
        else:
            self._init_schema()

    def close(self) -> None:
        """Close this thread's connection (a later call opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a forked child opens its own)."""
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():
            local.conn = connect_read_only(self.path) if self.read_only else connect(self.path)
            local.pid = os.getpid()
        return local.conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``BEGIN IMMEDIATE`` serialises writers across processes.
        Every commit bumps the generation (see :meth:`generation`)."""
        self.refuse_read_only()
        self.refuse_if_damaged()
        conn = self.conn()
        if conn.in_transaction:  # nested use from a method called inside another
            yield conn
            return
        self.refuse_hard_link()
        if not self._checked:  # never write into a damaged file
            _quick_check(conn)
            self._checked = True
        conn.execute("BEGIN IMMEDIATE")
        undo: list[Callable[[], object]] = []
        self._local.undo = undo
        try:
            yield conn
            conn.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'"
            )
            conn.execute("COMMIT")
        except BaseException:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                for step in reversed(undo):
                    with contextlib.suppress(Exception):
                        step()
            raise
        finally:
            self._local.undo = None

    def on_rollback(self, undo: Callable[[], object]) -> None:
        """Call ``undo`` should the write transaction now running not commit (the journal
        voids the events it appended for it)."""
        steps = getattr(self._local, "undo", None)
        if steps is None:
            raise RuntimeError("on_rollback() is for use inside Index.write()")
        steps.append(undo)

    def generation(self) -> int:
        """A number that changes with every committed write (by any process)."""
        if not self.has_meta:  # read-only v1 index: only other connections write
            return int(self.conn().execute("PRAGMA data_version").fetchone()[0])
        row = self.conn().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def columns(self) -> str:
        """The entry columns for a SELECT (those a read-only older index lacks, such as a v1
        index's run_id, read as NULL)."""
        return ", ".join(f"NULL AS {c}" if c in self.absent else c for c in COLUMNS)

    @property
    def has_run_id(self) -> bool:
        return "run_id" not in self.absent

    # -- refusals and errors ---------------------------------------------------------------

    def refuse_read_only(self) -> None:
        if self.read_only:
            why = (
                "it was opened with read_only=True"
                if writable(self.root, self.path)
                else "its folder or index.sqlite cannot be written (a read-only mount or "
                "another user's folder?)"
            )
            raise RegistryError(
                f"the registry at {self.root} is read-only: {why}; reading works, but to "
                "register, import, remove or change entries open a writable copy"
            )

    def refuse_hard_link(self) -> None:
        """RegistryError when index.sqlite has another hard link: a write would change the
        file under its other names too (a ``cp -al`` backup, say)."""
        try:
            found = os.lstat(self.path)
        except FileNotFoundError:
            return
        links = found.st_nlink
        if stat.S_ISREG(found.st_mode) and links > 1:  # a folder's count is never 1
            raise RegistryError(
                f"the registry index {self.path} has {links} hard links: a write would change "
                "the file under its other names too, and peftkit never writes through a link; "
                "give it a file of its own (with no peftkit using the registry: cp "
                "index.sqlite index.own && mv index.own index.sqlite) and try again"
            )

    def refuse_if_damaged(self) -> None:
        if self.damage is not None:
            raise RegistryError(self.damage)

    def error(self, exc: sqlite3.DatabaseError) -> RegistryError:
        """The RegistryError for an SQLite error; damage is confirmed by quick_check and
        remembered, so that no later write goes into the damaged file."""
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            return RegistryError(
                f"the index {self.path} stayed locked by another process for "
                f"{BUSY_TIMEOUT_S:.0f} s ({exc}); try again when it is done"
            )
        if "readonly" in text or "read-only" in text:
            self.read_only = True
            try:
                self.refuse_read_only()
            except RegistryError as err:
                return err
        detail = self._damage_detail(exc)
        if detail is None:
            return RegistryError(f"the index {self.path} cannot be used: {exc}")
        self.damage = (
            f"the registry index {self.path} is damaged ({detail}); no adapter file was "
            f"touched. Run 'peftkit adapters --registry {self.root} rebuild' (or "
            "Registry.rebuild_index()) to move it aside and rebuild the index from the "
            "version folders"
        )
        return RegistryError(self.damage)

    # -- damage ----------------------------------------------------------------------------

    def damage_problem(self) -> Problem | None:
        """The ``damaged-index`` problem, when quick_check (or an earlier error) finds one."""
        if self.damage is None:
            try:
                _quick_check(self.conn())
                return None
            except sqlite3.DatabaseError as exc:
                self.error(exc)
            if self.damage is None:
                return None
        return Problem("damaged-index", str(self.path), self.damage)

    def move_damaged_aside(self) -> Path | None:
        """Rename a damaged index (and its -wal / -shm) aside and open a fresh one; the
        path it was moved to, or None when it was not damaged."""
        if self.damage_problem() is None:
            return None
        self.close()
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.rename(src, f"{aside}{suffix}")
        self.damage, self._checked = None, False
        try:
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise self.error(exc) from None
        log.info("moved the damaged index %s aside to %s", self.path, aside)  # the report says so
        return aside

    def _damage_detail(self, exc: sqlite3.DatabaseError) -> str | None:
        """What quick_check says is wrong, or the error itself when the file cannot even
        be checked; None when the index checks out (the error was something else)."""
        try:
            with contextlib.closing(connect_read_only(self.path)) as probe:
                rows = [r[0] for r in probe.execute("PRAGMA quick_check(5)")]
        except sqlite3.DatabaseError as check_exc:
            return f"{exc}; quick_check: {check_exc}"
        if rows == ["ok"]:
            damaged = any(w in str(exc).lower() for w in _DAMAGE_WORDS)
            return f"{exc}" if damaged else None
        return f"{exc}; quick_check: " + "; ".join(rows)

    # -- schema ----------------------------------------------------------------------------

    def _init_schema(self) -> None:
        conn = self.conn()
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found != SCHEMA_VERSION:
            self._checked = False
            with self.write():
                self._migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])
        self.owner = conn.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()[0]

    def _migrate(self, conn: sqlite3.Connection, found: int) -> None:
        """Create the schema (``found == 0``) or bring an older index to this version, keeping
        its rows. Runs inside the write transaction (its generation bump needs the meta table)."""
        self._refuse_newer(found)
        if found == 1:
            conn.execute("ALTER TABLE entries ADD COLUMN run_id TEXT")
        for statement in (*_SCHEMA, *_V2, *_V3, *_V4):
            conn.execute(statement)
        have = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
        for column in _V4_COLUMNS:
            if column not in have:
                conn.execute(f"ALTER TABLE entries ADD COLUMN {column} TEXT")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (uuid.uuid4().hex,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _open_read_only(self) -> None:
        if not self.path.is_file():
            raise RegistryError(
                f"the registry at {self.root} is read-only and has no index.sqlite; give the "
                "folder of a registry (it holds index.sqlite and adapters/)"
            )
        conn = self.conn()
        self._refuse_newer(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        if "entries" not in tables:
            raise RegistryError(f"the read-only registry at {self.root} has an empty index")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
        self.absent = frozenset(COLUMNS) - columns
        self.has_meta = "meta" in tables

    def _refuse_newer(self, found: int) -> None:
        if found > SCHEMA_VERSION:
            raise RegistryError(
                f"the registry at {self.root} has schema version {found}, "
                f"newer than this peftkit's {SCHEMA_VERSION}; upgrade peftkit"
            )


# -- version counters (inside a write transaction) -----------------------------------------


def allocate_version(conn: sqlite3.Connection, name: str, floor: int = 0) -> int:
    """The next version of ``name`` (above ``floor``, the highest folder on disk); call
    inside the write transaction."""
    row = conn.execute("SELECT name, last_version FROM names WHERE name = ?", (name,)).fetchone()
    if (
        row is not None
        and row[0] != name
        and conn.execute("SELECT 1 FROM entries WHERE name = ?", (row[0],)).fetchone()
    ):
        raise ConfigError(
            f"adapter name {name!r} differs only in case from the registered "
            f"{row[0]!r} (names are folders, and many file systems ignore case); "
            f"use {row[0]!r} or another name"
        )
    version = max(0 if row is None else row[1], floor) + 1
    if version > MAX_VERSION:
        raise RegistryError(
            f"adapter {name!r} has used every version number up to {MAX_VERSION}; "
            "register it under another name"
        )
    if row is None:
        conn.execute("INSERT INTO names (name, last_version) VALUES (?, ?)", (name, version))
    else:
        conn.execute(
            "UPDATE names SET name = ?, last_version = ? WHERE name = ?", (name, version, row[0])
        )
    return version


def raise_counter(conn: sqlite3.Connection, name: str, version: int) -> None:
    """Keep ``name``'s version counter at or above ``version`` (a folder found on disk)."""
    conn.execute(
        "INSERT INTO names (name, last_version) VALUES (?, ?) ON CONFLICT(name) DO UPDATE"
        " SET last_version = MAX(last_version, excluded.last_version)",
        (name, version),
    )


# -- connections ---------------------------------------------------------------------------


def writable(root: Path, index: Path) -> bool:
    """Whether the registry can be written: its folder (or the nearest existing parent,
    for a new one) and its index, if there is one."""
    if index.exists():
        return os.access(index, os.W_OK) and os.access(root, os.W_OK)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return os.access(existing, os.W_OK)


def connect(index: Path) -> sqlite3.Connection:
    """A writable connection in WAL mode (retried while another process holds the file)."""
    conn = sqlite3.connect(index, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:  # switching to WAL needs a moment alone with the file
        try:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                return conn
            problem = "SQLite did not switch the index to WAL mode"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc).lower() and "busy" not in str(exc).lower():
                conn.close()
                raise
            problem = str(exc)
        if time.monotonic() > deadline:
            conn.close()
            raise sqlite3.OperationalError(f"{index}: {problem} (database is locked)")
        time.sleep(0.02)


def connect_read_only(index: Path) -> sqlite3.Connection:
    """A read-only connection: ``mode=ro``, or ``immutable=1`` where SQLite cannot even
    create the shared-memory file a WAL index needs (a read-only mount)."""
    uri = f"file:{quote(str(index))}?mode=ro"
    try:
        return _probe(uri)
    except sqlite3.OperationalError:
        return _probe(uri + "&immutable=1")


def _probe(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        conn.close()
        raise
    return conn


def _quick_check(conn: sqlite3.Connection) -> None:
    rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
    if rows != ["ok"]:
        raise sqlite3.DatabaseError("quick_check: " + "; ".join(rows))

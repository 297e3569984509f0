"""The arena's SQLite database: prompts, models, their answers and the votes cast on them.

One file, ``arena.sqlite`` in the arena directory, written with the standard library's sqlite3
in WAL mode, so that the web app's readers never wait on a writer and a crash never leaves half
a vote. Everything is append-only: triggers refuse UPDATE and DELETE on every table, so nothing
generated or voted is ever overwritten. A vote is one row, written in one transaction; a unique
index on (voter, prompt, model pair) refuses a second vote by the same voter on the same pair.

This module sits at the eval level because the gate reads votes; ``hebtron.arena`` (above eval)
generates the answers and serves the voting page through it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hebtron.errors import UserError

DB_NAME = "arena.sqlite"
SCHEMA_VERSION = 1
# What a voter may say about the answer shown on the left (A) and the one on the right (B).
OUTCOMES = ("a", "b", "tie", "both_bad")
BUSY_TIMEOUT_MS = 15_000

_TABLES = ("models", "prompts", "answers", "votes")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    checkpoint TEXT NOT NULL,
    info TEXT NOT NULL,             -- JSON: resolved weights, tokenizer, step, sampling settings, template
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prompts (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,       -- sha256 of the messages' canonical JSON
    messages TEXT NOT NULL,         -- JSON list of {"role", "content"}
    lang TEXT,
    label TEXT                      -- the prompt file's own id, if it had one
);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES models(id),
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    finish TEXT NOT NULL CHECK (finish IN ('stop', 'length')),
    seed INTEGER NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (model_id, prompt_id)
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    model_a INTEGER NOT NULL REFERENCES models(id),   -- shown on the left
    model_b INTEGER NOT NULL REFERENCES models(id),   -- shown on the right
    outcome TEXT NOT NULL CHECK (outcome IN ('a', 'b', 'tie', 'both_bad')),
    voter TEXT NOT NULL,
    created TEXT NOT NULL,
    pair_lo INTEGER NOT NULL,
    pair_hi INTEGER NOT NULL,
    CHECK (model_a != model_b),
    CHECK (pair_lo = min(model_a, model_b) AND pair_hi = max(model_a, model_b))
);
CREATE UNIQUE INDEX IF NOT EXISTS one_vote_per_voter_and_pair ON votes (voter, prompt_id, pair_lo, pair_hi);
CREATE INDEX IF NOT EXISTS votes_by_pair ON votes (pair_lo, pair_hi);
""" + "".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_never_updated BEFORE UPDATE ON {table} "
    f"BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END;\n"
    f"CREATE TRIGGER IF NOT EXISTS {table}_never_deleted BEFORE DELETE ON {table} "
    f"BEGIN SELECT RAISE(ABORT, '{table} are append-only'); END;\n"
    for table in _TABLES
)


@dataclass(frozen=True)
class Model:
    id: int
    name: str
    checkpoint: str
    info: dict[str, Any]


@dataclass(frozen=True)
class Prompt:
    id: int
    messages: list[dict[str, str]]
    lang: str | None
    label: str | None

    @property
    def last_user_text(self) -> str:
        """What the voter reads as the question: the last user turn."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


@dataclass(frozen=True)
class Vote:
    prompt_id: int
    model_a: int
    model_b: int
    outcome: str
    voter: str
    created: str


def now() -> str:
    """UTC time, to the millisecond, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def db_path(arena: str | Path) -> Path:
    """The database file of an arena directory (or the file itself)."""
    arena = Path(arena)
    return arena / DB_NAME if arena.is_dir() or arena.suffix != ".sqlite" else arena


def prompt_key(messages: Sequence[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(list(messages), ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def connect(arena: str | Path, create: bool = False, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit, see :func:`transaction`).

    ``create`` makes the file and its schema (WAL mode is a property of the file, set once);
    otherwise a missing file is a usage error naming the command that makes one."""
    path = db_path(arena)
    if not path.is_file():
        if not create:
            raise UserError(f"{path}: no arena database (make one with `hebtron arena generate`)")
        path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"{path.resolve().as_uri()}?mode={'ro' if readonly else 'rwc'}"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
    except sqlite3.Error as err:
        raise UserError(f"{path}: cannot open the arena database ({err})") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if create:
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise UserError(f"{path}: SQLite refused WAL mode (a network file system?)")
            # one transaction of its own (executescript may commit a pending one first)
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{SCHEMA}"
                f"INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');\n"
                f"INSERT OR IGNORE INTO meta VALUES ('created', '{now()}');\nCOMMIT;")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        conn.close()
        raise UserError(f"{path}: not an arena database ({err})") from None
    except BaseException:
        conn.close()
        raise
    if row is None or row[0] != str(SCHEMA_VERSION):
        conn.close()
        raise UserError(f"{path}: meta.schema_version is {row and row[0]!r}, expected {SCHEMA_VERSION!r}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (takes the write lock up front: no deadlock between two upgrading readers),
    COMMIT on success, ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextmanager
def opened(arena: str | Path, readonly: bool = False) -> Iterator[sqlite3.Connection]:
    with closing(connect(arena, readonly=readonly)) as conn:
        yield conn


# ----------------------------------------------------------------------------- writing
def add_model(conn: sqlite3.Connection, name: str, checkpoint: str, info: dict[str, Any]) -> int:
    """The model's id; a name already present must carry the same checkpoint and settings
    (generation resumes), else it is refused: answers are never replaced."""
    row = conn.execute("SELECT id, checkpoint, info FROM models WHERE name = ?", (name,)).fetchone()
    blob = json.dumps(info, sort_keys=True, ensure_ascii=False)
    if row is not None:
        if row[1] != checkpoint or json.loads(row[2]) != json.loads(blob):
            raise UserError(f"--models {name}={checkpoint}: the arena already has a model named {name!r} "
                            f"({row[1]}, other settings); answers are never overwritten: pick another name")
        return int(row[0])
    with transaction(conn):
        cur = conn.execute("INSERT INTO models (name, checkpoint, info, created) VALUES (?, ?, ?, ?)",
                           (name, checkpoint, blob, now()))
    return int(cur.lastrowid)


def add_prompts(conn: sqlite3.Connection, prompts: Iterable[tuple[list[dict[str, str]], str | None, str | None]]) -> list[int]:
    """Ids of (messages, lang, label) prompts, adding the ones not yet stored (same messages, same id)."""
    ids = []
    with transaction(conn):
        for messages, lang, label in prompts:
            key = prompt_key(messages)
            conn.execute("INSERT OR IGNORE INTO prompts (key, messages, lang, label) VALUES (?, ?, ?, ?)",
                         (key, json.dumps(messages, ensure_ascii=False), lang, label))
            ids.append(int(conn.execute("SELECT id FROM prompts WHERE key = ?", (key,)).fetchone()[0]))
    return ids


def answered_prompts(conn: sqlite3.Connection, model_id: int) -> set[int]:
    return {r[0] for r in conn.execute("SELECT prompt_id FROM answers WHERE model_id = ?", (model_id,))}


def add_answers(conn: sqlite3.Connection, model_id: int, rows: Iterable[tuple[int, str, int, str, int]]) -> None:
    """(prompt_id, text, tokens, finish, seed) rows, in one transaction."""
    stamp = now()
    with transaction(conn):
        conn.executemany(
            "INSERT INTO answers (model_id, prompt_id, text, tokens, finish, seed, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(model_id, p, text, tokens, finish, seed, stamp) for p, text, tokens, finish, seed in rows])


def record_vote(conn: sqlite3.Connection, prompt_id: int, model_a: int, model_b: int, outcome: str, voter: str) -> bool:
    """Write one vote in one transaction; False when this voter already voted on this pair and
    prompt. Both answers must exist (a ValueError otherwise: the caller's input was wrong)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    if model_a == model_b:
        raise ValueError("a pair needs two different models")
    lo, hi = sorted((model_a, model_b))
    with transaction(conn):
        have = conn.execute("SELECT COUNT(*) FROM answers WHERE prompt_id = ? AND model_id IN (?, ?)",
                            (prompt_id, model_a, model_b)).fetchone()[0]
        if have != 2:
            raise ValueError(f"prompt {prompt_id} has no answers from models {model_a} and {model_b}")
        try:
            conn.execute("INSERT INTO votes (prompt_id, model_a, model_b, outcome, voter, created, pair_lo, pair_hi) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (prompt_id, model_a, model_b, outcome, voter, now(), lo, hi))
        except sqlite3.IntegrityError:
            return False
    return True


# ----------------------------------------------------------------------------- reading
def models(conn: sqlite3.Connection) -> list[Model]:
    return [Model(int(i), n, c, json.loads(info))
            for i, n, c, info in conn.execute("SELECT id, name, checkpoint, info FROM models ORDER BY id")]


def prompt(conn: sqlite3.Connection, prompt_id: int) -> Prompt | None:
    row = conn.execute("SELECT id, messages, lang, label FROM prompts WHERE id = ?", (prompt_id,)).fetchone()
    return None if row is None else Prompt(int(row[0]), json.loads(row[1]), row[2], row[3])


def answer(conn: sqlite3.Connection, model_id: int, prompt_id: int) -> str | None:
    row = conn.execute("SELECT text FROM answers WHERE model_id = ? AND prompt_id = ?", (model_id, prompt_id)).fetchone()
    return None if row is None else row[0]


def answers_by_model(conn: sqlite3.Connection) -> dict[int, set[int]]:
    """model id -> ids of the prompts it answered."""
    out: dict[int, set[int]] = {}
    for model_id, prompt_id in conn.execute("SELECT model_id, prompt_id FROM answers"):
        out.setdefault(int(model_id), set()).add(int(prompt_id))
    return out


def votes(conn: sqlite3.Connection) -> list[Vote]:
    return [Vote(*row) for row in conn.execute(
        "SELECT prompt_id, model_a, model_b, outcome, voter, created FROM votes ORDER BY id")]


def pair_prompt_counts(conn: sqlite3.Connection) -> dict[tuple[int, int, int], int]:
    """(pair_lo, pair_hi, prompt_id) -> votes cast on it."""
    return {(int(lo), int(hi), int(p)): int(n) for lo, hi, p, n in conn.execute(
        "SELECT pair_lo, pair_hi, prompt_id, COUNT(*) FROM votes GROUP BY pair_lo, pair_hi, prompt_id")}


def voted_by(conn: sqlite3.Connection, voter: str) -> set[tuple[int, int, int]]:
    """(pair_lo, pair_hi, prompt_id) this voter already voted on."""
    return {(int(lo), int(hi), int(p)) for lo, hi, p in conn.execute(
        "SELECT pair_lo, pair_hi, prompt_id FROM votes WHERE voter = ?", (voter,))}


def read_standings(conn: sqlite3.Connection, rounds: int = 1000, seed: int = 0):  # -> arena_ratings.Standings
    """Ratings, intervals and head-to-head records of every model in the database."""
    from hebtron.eval.arena_ratings import standings

    names = {m.id: m.name for m in models(conn)}
    cast = votes(conn)
    outcomes = [(names[v.model_a], names[v.model_b], v.outcome) for v in cast]
    return standings(list(names.values()), outcomes, voters=len({v.voter for v in cast}), rounds=rounds, seed=seed)

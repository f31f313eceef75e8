"""SQL that makes PostgreSQL 15 write WAL of every page-changing resource manager.

A schema, then three phases over the same relations, so pages have long histories that span the cut points
between phases. Phases 2 and 3 checkpoint in the middle, so pages get full-page images again, and each phase
compresses those images differently. Deterministic: no random(), no time.
"""

from __future__ import annotations

SCHEMA = [
    "CREATE EXTENSION bloom",
    # Heap with a HOT-friendly fillfactor, a btree with duplicates (deduplication), TOAST.
    "CREATE TABLE items (id int PRIMARY KEY, grp int, label text, payload text) WITH (fillfactor = 80)",
    "CREATE INDEX items_grp ON items (grp)",
    "ALTER TABLE items ALTER COLUMN payload SET STORAGE EXTERNAL",
    "CREATE TABLE hashed (id int, k int)",
    "CREATE INDEX hashed_k ON hashed USING hash (k)",
    "CREATE TABLE docs (id int, tags int[], body tsvector)",
    "CREATE INDEX docs_tags ON docs USING gin (tags) WITH (fastupdate = on, gin_pending_list_limit = 64)",
    "CREATE INDEX docs_body ON docs USING gin (body) WITH (fastupdate = off)",
    "CREATE TABLE shapes (id int, p point, b box, t text)",
    "CREATE INDEX shapes_gist ON shapes USING gist (b)",
    "CREATE INDEX shapes_spgist_p ON shapes USING spgist (p)",
    "CREATE INDEX shapes_spgist_t ON shapes USING spgist (t)",
    "CREATE TABLE events (id int, at int, note text)",
    "CREATE INDEX events_brin ON events USING brin (at) WITH (pages_per_range = 2, autosummarize = off)",
    "CREATE TABLE bloomy (id int, a int, b int)",
    "CREATE INDEX bloomy_bloom ON bloomy USING bloom (a, b)",
    "CREATE SEQUENCE counter CACHE 1",
    "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text)",
    "INSERT INTO items SELECT g, g % 50, 'item ' || g, NULL FROM generate_series(1, 2000) g",
]


def _items(first: int, last: int) -> list[str]:
    return [
        f"INSERT INTO items SELECT g, g % 50, 'item ' || g, CASE WHEN g % 97 = 0 THEN repeat(md5(g::text), 300) END"
        f" FROM generate_series({first}, {last}) g",
        # HOT updates (indexed columns unchanged) and non-HOT updates (grp changes).
        f"UPDATE items SET label = label || '+' WHERE id BETWEEN {first} AND {last} AND id % 3 = 0",
        f"UPDATE items SET grp = grp + 1 WHERE id BETWEEN {first} AND {last} AND id % 7 = 0",
        f"DELETE FROM items WHERE id BETWEEN {first} AND {last} AND id % 11 = 0",
        f"BEGIN; SELECT count(*) FROM (SELECT * FROM items WHERE id BETWEEN {first} AND {first + 200}"
        f" FOR UPDATE) s; COMMIT",
        f"BEGIN; SELECT count(*) FROM (SELECT * FROM items WHERE id BETWEEN {first + 300} AND {first + 400}"
        f" FOR SHARE) s; COMMIT",
    ]


def _indexes(phase: int) -> list[str]:
    base = phase * 100_000
    return [
        f"INSERT INTO hashed SELECT g, g % 5000 FROM generate_series({base}, {base + 15000}) g",
        f"DELETE FROM hashed WHERE id BETWEEN {base} AND {base + 15000} AND id % 4 <> 0",
        f"INSERT INTO docs SELECT g, ARRAY[g % 10, g % 7, {phase}], to_tsvector('simple', 'w' || (g % 40) ||"
        f" ' common x' || (g % 3)) FROM generate_series({base}, {base + 3000}) g",
        f"DELETE FROM docs WHERE id BETWEEN {base} AND {base + 3000} AND id % 5 = 0",
        f"INSERT INTO shapes SELECT g, point(g % 300, g / 300), box(point(g % 97, g % 89), point(g % 97 + 2,"
        f" g % 89 + 3)), 'k' || (g % 1000) FROM generate_series({base}, {base + 6000}) g",
        f"DELETE FROM shapes WHERE id BETWEEN {base} AND {base + 6000} AND id % 3 = 0",
        f"INSERT INTO events SELECT g, g, 'e' FROM generate_series({base}, {base + 4000}) g",
        "SELECT brin_summarize_new_values('events_brin')",
        f"UPDATE events SET at = at + 1 WHERE id BETWEEN {base} AND {base + 400}",
        "SELECT brin_desummarize_range('events_brin', 0)",
        "SELECT brin_summarize_range('events_brin', 0)",
        f"INSERT INTO bloomy SELECT g, g % 13, g % 17 FROM generate_series({base}, {base + 3000}) g",
        "SELECT count(nextval('counter')) FROM generate_series(1, 300)",
        f"SELECT setval('counter', {phase * 1000})",
        f"INSERT INTO scratch SELECT g, 'v' FROM generate_series({base}, {base + 500}) g",
    ]


def _vacuum() -> list[str]:
    return [
        "VACUUM items", "VACUUM hashed", "VACUUM docs", "VACUUM shapes", "VACUUM events", "VACUUM bloomy",
        "VACUUM FREEZE items",
    ]


PHASE1 = [
    *_items(2001, 6000),
    *_indexes(1),
    "CREATE INDEX items_label ON items (label)",  # logged as full-page images of the new index
    *_vacuum(),
]

PHASE2 = [
    *_items(6001, 9000),
    "CHECKPOINT",
    # Reading rows whose hint bits are unset, after a checkpoint: FPI_FOR_HINT (wal_log_hints is on).
    "SELECT count(*) FROM items",
    *_indexes(2),
    "DELETE FROM items WHERE id BETWEEN 1 AND 1500",  # btree pages emptied: page deletion on vacuum
    *_vacuum(),
    "DELETE FROM items WHERE id > 8000",
    "VACUUM items",  # truncates the heap's tail
]

PHASE3 = [
    "CHECKPOINT",
    "SELECT count(*) FROM items",
    *_items(9001, 11000),
    *_indexes(3),
    "INSERT INTO docs SELECT g, ARRAY[1, 2], to_tsvector('simple', 'common') FROM generate_series(1, 3000) g",
    "SELECT gin_clean_pending_list('docs_tags')",
    "CHECKPOINT",
    "UPDATE items SET label = label || '!' WHERE id % 5 = 0",
    *_vacuum(),
]


def _transactions(phase: int, count: int) -> list[str]:
    """Transaction status, MultiXacts, two-phase state and relation maps: what lives outside relation pages."""
    return [
        # Many short transactions (one CLOG page holds 32768), some of them with aborted subtransactions.
        "CREATE TABLE IF NOT EXISTS ticks (id int, phase int)",
        f"DO $$ BEGIN FOR i IN 1..{count} LOOP INSERT INTO ticks VALUES (i, {phase}); "
        "IF i % 10 = 0 THEN BEGIN INSERT INTO ticks VALUES (-i, 0); RAISE EXCEPTION 'undo'; "
        "EXCEPTION WHEN raise_exception THEN NULL; END; END IF; COMMIT; END LOOP; END $$",
        "BEGIN; INSERT INTO ticks VALUES (1, 1); SAVEPOINT a; INSERT INTO ticks VALUES (2, 2); RELEASE a; "
        "SAVEPOINT b; INSERT INTO ticks VALUES (3, 3); ROLLBACK TO b; COMMIT",
        "BEGIN; INSERT INTO ticks VALUES (4, 4); ROLLBACK",
        # MultiXacts: a row share-locked by a transaction and updated by its subtransaction (2048 per offsets
        # page, 1636 members per members page).
        "DO $$ BEGIN FOR i IN 2001..4500 LOOP PERFORM 1 FROM items WHERE id = i FOR SHARE; "
        "BEGIN UPDATE items SET grp = grp WHERE id = i; EXCEPTION WHEN others THEN RAISE; END; COMMIT; "
        "END LOOP; END $$",
        # Two-phase: one committed, one rolled back, one left prepared for the next phase (or the crash).
        f"BEGIN; INSERT INTO ticks VALUES (5, {phase}); PREPARE TRANSACTION 'keep{phase}'",
        f"BEGIN; INSERT INTO ticks VALUES (6, {phase}); PREPARE TRANSACTION 'commit{phase}'",
        f"COMMIT PREPARED 'commit{phase}'",
        f"BEGIN; INSERT INTO ticks VALUES (7, {phase}); PREPARE TRANSACTION 'abort{phase}'",
        f"ROLLBACK PREPARED 'abort{phase}'",
        *([f"COMMIT PREPARED 'keep{phase - 1}'"] if phase > 1 else []),
        # Relation maps: rewriting mapped catalogs, local and shared.
        "VACUUM FULL pg_class",
        "VACUUM FULL pg_database",
        # New relfilenodes and dropped ones.
        f"CREATE TABLE gone{phase} AS SELECT g FROM generate_series(1, 1000) g",
        f"TRUNCATE gone{phase}",
        f"DROP TABLE gone{phase}",
    ]


PHASE1 += _transactions(1, 12_000)
PHASE2 += _transactions(2, 12_000)
PHASE3 += _transactions(3, 12_000)

PHASES = [PHASE1, PHASE2, PHASE3]
WAL_COMPRESSION = ["pglz", "lz4", "zstd"]  # full-page image compression, one per phase

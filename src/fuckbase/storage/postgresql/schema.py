"""The PostgreSQL backend's schema, created and migrated by the server itself.

Each step of MIGRATIONS brings the schema from one version to the next; `fb_meta` records the
version reached. Every node runs `migrate` at start under an advisory lock, so nodes started
together migrate once, and a node older than the schema refuses to start.

Values are stored as `json`, which keeps the exact text the API was given (the embedded
backend returns the same bytes) and which PostgreSQL's JSON operators and a cast to `jsonb`
can still query. Index contents live in side tables whose keys order like the embedded
backend's (the shared encodings of `fuckbase.storage.values`), so a lookup and a sorted page
are index scans and the two backends sort alike; counts per set and per indexed value keep
`total` and /server/info from counting rows.
"""

from __future__ import annotations

from typing import Any

import psycopg

MIGRATION_LOCK = 0x66756B62  # the advisory lock nodes migrate under ("fukb")

MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE fb_meta (key text PRIMARY KEY, value bigint NOT NULL);
    -- seq: the last commit's number; catalog: moves with every change of databases, sets, indexes
    CREATE TABLE fb_state (id int PRIMARY KEY CHECK (id = 1), seq bigint NOT NULL, catalog bigint NOT NULL);
    INSERT INTO fb_state VALUES (1, 0, 0);
    -- a database's name is NULL while it is staged by a restore or dropped (`dropped` then set)
    CREATE TABLE fb_databases (
        id bigserial PRIMARY KEY,
        name text COLLATE "C" UNIQUE,
        auth jsonb,
        dropped boolean NOT NULL DEFAULT false
    );
    CREATE TABLE fb_sets (
        id bigserial PRIMARY KEY,
        database_id bigint NOT NULL REFERENCES fb_databases ON DELETE CASCADE,
        name text COLLATE "C" NOT NULL,
        UNIQUE (database_id, name)
    );
    CREATE TABLE fb_indexes (
        id bigserial PRIMARY KEY,
        set_id bigint NOT NULL REFERENCES fb_sets ON DELETE CASCADE,
        name text COLLATE "C" NOT NULL,
        field text NOT NULL,
        kind text NOT NULL CHECK (kind IN ('basic', 'sortable')),
        sort_fields text[] NOT NULL DEFAULT '{}',
        ready boolean NOT NULL DEFAULT false,
        UNIQUE (set_id, name)
    );
    CREATE TABLE fb_entries (
        set_id bigint NOT NULL,
        key text COLLATE "C" NOT NULL,
        value json NOT NULL,
        PRIMARY KEY (set_id, key)
    );
    -- grp: the indexed text (long ones as a digest); sort: the order-preserving sort token
    CREATE TABLE fb_basic (
        index_id bigint NOT NULL,
        grp bytea NOT NULL,
        key text COLLATE "C" NOT NULL,
        PRIMARY KEY (index_id, grp, key)
    );
    CREATE TABLE fb_sorted (
        index_id bigint NOT NULL,
        field smallint NOT NULL,
        grp bytea NOT NULL,
        sort bytea NOT NULL,
        key text COLLATE "C" NOT NULL,
        PRIMARY KEY (index_id, field, grp, sort, key)
    );
    CREATE TABLE fb_set_counts (set_id bigint PRIMARY KEY, n bigint NOT NULL);
    CREATE TABLE fb_group_counts (
        index_id bigint NOT NULL,
        grp bytea NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (index_id, grp)
    );
    CREATE TABLE fb_changes (seq bigint PRIMARY KEY, t double precision NOT NULL, n int NOT NULL,
                             record bytea NOT NULL);
    CREATE TABLE fb_consumers (name text PRIMARY KEY, acked bigint NOT NULL);
    -- what a drop or a restore left for housekeeping to reclaim: ('database' | 'index', id)
    CREATE TABLE fb_garbage (kind text NOT NULL, id bigint NOT NULL, PRIMARY KEY (kind, id));
    -- the end of every write: the counts, then (numbered) the next sequence number and the
    -- change, when a consumer retains changes
    CREATE FUNCTION fb_commit(set_ids bigint[], set_deltas bigint[], ix_ids bigint[], grps bytea[],
                              grp_deltas bigint[], at double precision, ops int, rec bytea, numbered boolean,
                              catalog_changed boolean)
    RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        s bigint;
    BEGIN
        IF catalog_changed THEN
            UPDATE fb_state SET catalog = catalog + 1 WHERE id = 1;
        END IF;
        INSERT INTO fb_set_counts AS c (set_id, n)
            SELECT u.i, u.d FROM unnest(set_ids, set_deltas) AS u(i, d)
            ON CONFLICT (set_id) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO fb_group_counts AS c (index_id, grp, n)
            SELECT u.i, u.g, u.d FROM unnest(ix_ids, grps, grp_deltas) AS u(i, g, d)
            ON CONFLICT (index_id, grp) DO UPDATE SET n = c.n + excluded.n;
        IF NOT numbered THEN
            RETURN NULL;
        END IF;
        UPDATE fb_state SET seq = seq + 1 WHERE id = 1 RETURNING seq INTO s;
        IF EXISTS (SELECT 1 FROM fb_consumers) THEN
            INSERT INTO fb_changes VALUES (s, at, ops, rec);
        END IF;
        RETURN s;
    END $$;
    -- one entry stored or replaced (writers hold the sequence row: no other changes it
    -- meanwhile); returns the value it replaces, for the index records
    CREATE FUNCTION fb_put(sid bigint, k text, v json) RETURNS text LANGUAGE plpgsql AS $$
    DECLARE
        old text;
    BEGIN
        SELECT value::text INTO old FROM fb_entries WHERE set_id = sid AND key = k;
        INSERT INTO fb_entries VALUES (sid, k, v) ON CONFLICT (set_id, key) DO UPDATE SET value = excluded.value;
        RETURN old;
    END $$;
    """,
    # version 2: the entries and index records of a write transaction in one call, as JSON
    # ({"puts": [[set id, key, value], ...], "deletes": [[set id, key], ...], "add_basic" and
    # "del_basic": [[index id, group hex, key], ...], "add_sorted" and "del_sorted": [[index id,
    # field, group hex, sort hex, key], ...]}); the counts per indexed value move by the sortable
    # records actually removed and added (only pages read counts: basic indexes keep none).
    # While an index is built, writes keep its records for the keys up to `filled_to` only (none
    # while it is NULL): the build adds the records of the keys beyond, a range at a time.
    """
    ALTER TABLE fb_indexes ADD COLUMN filled_to text COLLATE "C";
    DELETE FROM fb_group_counts c USING fb_indexes i WHERE i.id = c.index_id AND i.kind = 'basic';
    -- the end of every write: the set counts, then, when it did something (ops > 0), the next
    -- sequence number and the change, when a consumer retains changes
    DROP FUNCTION fb_commit(bigint[], bigint[], bigint[], bytea[], bigint[], double precision, int, bytea,
                            boolean, boolean);
    CREATE FUNCTION fb_commit(set_ids bigint[], set_deltas bigint[], at double precision, ops int, rec bytea,
                              catalog_changed boolean)
    RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        s bigint;
    BEGIN
        IF catalog_changed THEN
            UPDATE fb_state SET catalog = catalog + 1 WHERE id = 1;
        END IF;
        INSERT INTO fb_set_counts AS c (set_id, n)
            SELECT u.i, u.d FROM unnest(set_ids, set_deltas) AS u(i, d)
            ON CONFLICT (set_id) DO UPDATE SET n = c.n + excluded.n;
        IF ops = 0 THEN
            RETURN NULL;
        END IF;
        UPDATE fb_state SET seq = seq + 1 WHERE id = 1 RETURNING seq INTO s;
        IF EXISTS (SELECT 1 FROM fb_consumers) THEN
            INSERT INTO fb_changes VALUES (s, at, ops, rec);
        END IF;
        RETURN s;
    END $$;
    CREATE FUNCTION fb_write(w json) RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO fb_entries SELECT (r->>0)::bigint, r->>1, r->2 FROM json_array_elements(w->'puts') AS r
            ON CONFLICT (set_id, key) DO UPDATE SET value = excluded.value;
        DELETE FROM fb_entries e USING json_array_elements(w->'deletes') AS r
         WHERE e.set_id = (r->>0)::bigint AND e.key = (r->>1) COLLATE "C";
        DELETE FROM fb_basic b USING json_array_elements(w->'del_basic') AS r
         WHERE b.index_id = (r->>0)::bigint AND b.grp = decode(r->>1, 'hex') AND b.key = (r->>2) COLLATE "C";
        INSERT INTO fb_basic SELECT (r->>0)::bigint, decode(r->>1, 'hex'), r->>2
          FROM json_array_elements(w->'add_basic') AS r
            ON CONFLICT DO NOTHING;
        WITH gone AS (
            DELETE FROM fb_sorted s USING json_array_elements(w->'del_sorted') AS r
             WHERE s.index_id = (r->>0)::bigint AND s.field = (r->>1)::smallint AND s.grp = decode(r->>2, 'hex')
               AND s.sort = decode(r->>3, 'hex') AND s.key = (r->>4) COLLATE "C"
            RETURNING s.index_id, s.grp, s.field
        ), came AS (
            INSERT INTO fb_sorted SELECT (r->>0)::bigint, (r->>1)::smallint, decode(r->>2, 'hex'), decode(r->>3, 'hex'),
                                         r->>4
              FROM json_array_elements(w->'add_sorted') AS r
            ON CONFLICT DO NOTHING RETURNING index_id, grp, field
        ), moved AS (
            SELECT index_id, grp, -1 AS d FROM gone WHERE field = 0
            UNION ALL SELECT index_id, grp, 1 FROM came WHERE field = 0
        )
        INSERT INTO fb_group_counts AS c (index_id, grp, n)
        SELECT index_id, grp, sum(d) FROM moved GROUP BY index_id, grp HAVING sum(d) <> 0
            ON CONFLICT (index_id, grp) DO UPDATE SET n = c.n + excluded.n;
    END $$;
    """,
    # version 3: fb_write with each part a parameter of its own (NULL: none), the same arrays
    # as version 2's: PostgreSQL parses each part once and skips the absent ones, where
    # `w->'part'` parsed the whole write once per part. Version 2's fb_write stays for nodes
    # of the previous release still running during an upgrade. fb_read_ahead: what a group of
    # writes reads first ([[set id, key, whether the value is wanted], ...]: the position of
    # each entry found, with its value when wanted), and fb_lock, the sequence row every write
    # takes first (returning the catalog version), in functions so that their plans are kept.
    """
    CREATE FUNCTION fb_lock() RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        version bigint;
    BEGIN
        SELECT catalog INTO version FROM fb_state WHERE id = 1 FOR UPDATE;
        RETURN version;
    END $$;
    CREATE FUNCTION fb_read_ahead(wanted json) RETURNS TABLE (pos bigint, found json) LANGUAGE plpgsql STABLE AS $$
    BEGIN
        RETURN QUERY
        SELECT q.i - 1, CASE WHEN q.r->>2 = 'true' THEN e.value END
          FROM json_array_elements(wanted) WITH ORDINALITY AS q(r, i)
          JOIN fb_entries e ON e.set_id = (q.r->>0)::bigint AND e.key = (q.r->>1) COLLATE "C";
    END $$;
    CREATE FUNCTION fb_write(puts json, deletes json, add_basic json, del_basic json, add_sorted json,
                             del_sorted json)
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF puts IS NOT NULL THEN
            INSERT INTO fb_entries SELECT (r->>0)::bigint, r->>1, r->2 FROM json_array_elements(puts) AS r
                ON CONFLICT (set_id, key) DO UPDATE SET value = excluded.value;
        END IF;
        IF deletes IS NOT NULL THEN
            DELETE FROM fb_entries e USING json_array_elements(deletes) AS r
             WHERE e.set_id = (r->>0)::bigint AND e.key = (r->>1) COLLATE "C";
        END IF;
        IF del_basic IS NOT NULL THEN
            DELETE FROM fb_basic b USING json_array_elements(del_basic) AS r
             WHERE b.index_id = (r->>0)::bigint AND b.grp = decode(r->>1, 'hex') AND b.key = (r->>2) COLLATE "C";
        END IF;
        IF add_basic IS NOT NULL THEN
            INSERT INTO fb_basic SELECT (r->>0)::bigint, decode(r->>1, 'hex'), r->>2
              FROM json_array_elements(add_basic) AS r
                ON CONFLICT DO NOTHING;
        END IF;
        IF add_sorted IS NULL AND del_sorted IS NULL THEN
            RETURN;
        END IF;
        WITH gone AS (
            DELETE FROM fb_sorted s USING json_array_elements(del_sorted) AS r
             WHERE s.index_id = (r->>0)::bigint AND s.field = (r->>1)::smallint AND s.grp = decode(r->>2, 'hex')
               AND s.sort = decode(r->>3, 'hex') AND s.key = (r->>4) COLLATE "C"
            RETURNING s.index_id, s.grp, s.field
        ), came AS (
            INSERT INTO fb_sorted SELECT (r->>0)::bigint, (r->>1)::smallint, decode(r->>2, 'hex'), decode(r->>3, 'hex'),
                                         r->>4
              FROM json_array_elements(add_sorted) AS r
            ON CONFLICT DO NOTHING RETURNING index_id, grp, field
        ), moved AS (
            SELECT index_id, grp, -1 AS d FROM gone WHERE field = 0
            UNION ALL SELECT index_id, grp, 1 FROM came WHERE field = 0
        )
        INSERT INTO fb_group_counts AS c (index_id, grp, n)
        SELECT index_id, grp, sum(d) FROM moved GROUP BY index_id, grp HAVING sum(d) <> 0
            ON CONFLICT (index_id, grp) DO UPDATE SET n = c.n + excluded.n;
    END $$;
    """,
    # version 4: a group of writes may read its entries before it takes the sequence row and
    # do its work meanwhile, then check under the row that nothing it read moved: fb_peek is
    # fb_read_ahead with each entry's row version (xmin) besides (fb_read_ahead stays for
    # nodes of the previous release); fb_lock_unchanged takes the row with fb_lock and fails
    # with serialization_failure when the catalog version or any entry's row version
    # ([[set id, key, xmin or NULL: absent], ...]) is not what was read.
    """
    CREATE FUNCTION fb_peek(wanted json) RETURNS TABLE (pos bigint, found json, version text)
    LANGUAGE plpgsql STABLE AS $$
    BEGIN
        RETURN QUERY
        SELECT q.i - 1, CASE WHEN q.r->>2 = 'true' THEN e.value END, e.xmin::text
          FROM json_array_elements(wanted) WITH ORDINALITY AS q(r, i)
          JOIN fb_entries e ON e.set_id = (q.r->>0)::bigint AND e.key = (q.r->>1) COLLATE "C";
    END $$;
    CREATE FUNCTION fb_lock_unchanged(seen_catalog bigint, seen json) RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        version bigint := fb_lock();
    BEGIN
        IF version <> seen_catalog OR EXISTS (
            SELECT 1 FROM json_array_elements(seen) AS q(r)
              LEFT JOIN fb_entries e ON e.set_id = (q.r->>0)::bigint AND e.key = (q.r->>1) COLLATE "C"
             WHERE e.xmin::text IS DISTINCT FROM q.r->>2) THEN
            RAISE EXCEPTION 'what the writes read moved before they took the sequence row'
                USING ERRCODE = 'serialization_failure';
        END IF;
        RETURN version;
    END $$;
    """,
    # version 5: fb_write_texts, fb_write with each put's value given as a JSON string holding
    # its text ([[set id, key, text], ...]): json_array_elements unescapes every string of what
    # it walks, and a value holding \u0000 (which `json` stores as it is) stopped the write.
    # Version 3's fb_write stays, for nodes of the previous release and for the other parts.
    """
    CREATE FUNCTION fb_write_texts(puts json, deletes json, add_basic json, del_basic json, add_sorted json,
                                   del_sorted json)
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF puts IS NOT NULL THEN
            INSERT INTO fb_entries SELECT (r->>0)::bigint, r->>1, (r->>2)::json FROM json_array_elements(puts) AS r
                ON CONFLICT (set_id, key) DO UPDATE SET value = excluded.value;
        END IF;
        PERFORM fb_write(NULL::json, deletes, add_basic, del_basic, add_sorted, del_sorted);
    END $$;
    """,
    # version 6: fb_write_parts, fb_write_texts's parts as `jsonb`, parsed once each (a `json`
    # argument is parsed again by every `->>` of every element); and fb_finish, a write
    # transaction's end in one statement, which a node prepares once per connection: with
    # seen_catalog, first fb_lock_unchanged (a group planned before it took the sequence row,
    # run as a transaction of its own), then fb_write_parts and fb_commit. Version 5's
    # fb_write_texts stays for nodes of the previous release.
    """
    CREATE FUNCTION fb_write_parts(puts jsonb, deletes jsonb, add_basic jsonb, del_basic jsonb, add_sorted jsonb,
                                   del_sorted jsonb)
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        IF puts IS NOT NULL THEN
            INSERT INTO fb_entries SELECT (r->>0)::bigint, r->>1, (r->>2)::json FROM jsonb_array_elements(puts) AS r
                ON CONFLICT (set_id, key) DO UPDATE SET value = excluded.value;
        END IF;
        IF deletes IS NOT NULL THEN
            DELETE FROM fb_entries e USING jsonb_array_elements(deletes) AS r
             WHERE e.set_id = (r->>0)::bigint AND e.key = (r->>1) COLLATE "C";
        END IF;
        IF del_basic IS NOT NULL THEN
            DELETE FROM fb_basic b USING jsonb_array_elements(del_basic) AS r
             WHERE b.index_id = (r->>0)::bigint AND b.grp = decode(r->>1, 'hex') AND b.key = (r->>2) COLLATE "C";
        END IF;
        IF add_basic IS NOT NULL THEN
            INSERT INTO fb_basic SELECT (r->>0)::bigint, decode(r->>1, 'hex'), r->>2
              FROM jsonb_array_elements(add_basic) AS r
                ON CONFLICT DO NOTHING;
        END IF;
        IF add_sorted IS NOT NULL OR del_sorted IS NOT NULL THEN
            WITH gone AS (
                DELETE FROM fb_sorted s USING jsonb_array_elements(del_sorted) AS r
                 WHERE s.index_id = (r->>0)::bigint AND s.field = (r->>1)::smallint AND s.grp = decode(r->>2, 'hex')
                   AND s.sort = decode(r->>3, 'hex') AND s.key = (r->>4) COLLATE "C"
                RETURNING s.index_id, s.grp, s.field
            ), came AS (
                INSERT INTO fb_sorted SELECT (r->>0)::bigint, (r->>1)::smallint, decode(r->>2, 'hex'),
                                             decode(r->>3, 'hex'), r->>4
                  FROM jsonb_array_elements(add_sorted) AS r
                ON CONFLICT DO NOTHING RETURNING index_id, grp, field
            ), moved AS (
                SELECT index_id, grp, -1 AS d FROM gone WHERE field = 0
                UNION ALL SELECT index_id, grp, 1 FROM came WHERE field = 0
            )
            INSERT INTO fb_group_counts AS c (index_id, grp, n)
            SELECT index_id, grp, sum(d) FROM moved GROUP BY index_id, grp HAVING sum(d) <> 0
                ON CONFLICT (index_id, grp) DO UPDATE SET n = c.n + excluded.n;
        END IF;
    END $$;
    CREATE FUNCTION fb_finish(seen_catalog bigint, seen json, puts jsonb, deletes jsonb, add_basic jsonb,
                              del_basic jsonb, add_sorted jsonb, del_sorted jsonb, set_ids bigint[],
                              set_deltas bigint[], at double precision, ops int, rec bytea,
                              catalog_changed boolean)
    RETURNS bigint LANGUAGE plpgsql AS $$
    BEGIN
        IF seen_catalog IS NOT NULL THEN
            PERFORM fb_lock_unchanged(seen_catalog, seen);
        END IF;
        PERFORM fb_write_parts(puts, deletes, add_basic, del_basic, add_sorted, del_sorted);
        RETURN fb_commit(set_ids, set_deltas, at, ops, rec, catalog_changed);
    END $$;
    """,
]

VERSION = len(MIGRATIONS)


class SchemaTooNew(Exception):
    """The database was migrated by a newer release than this one."""


def migrate(conn: psycopg.Connection[tuple[Any, ...]]) -> int:
    """Brings the schema to VERSION in one transaction; returns the version found."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        exists = conn.execute("SELECT to_regclass('fb_meta') IS NOT NULL").fetchone()
        found = 0
        if exists and exists[0]:
            row = conn.execute("SELECT value FROM fb_meta WHERE key = 'schema_version'").fetchone()
            found = int(row[0]) if row else 0
        if found > VERSION:
            raise SchemaTooNew(f"the database has schema version {found}; this release knows up to {VERSION}")
        for version in range(found, VERSION):
            conn.execute(MIGRATIONS[version].encode())
            conn.execute("INSERT INTO fb_meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE"
                         " SET value = excluded.value", (version + 1,))
    return found

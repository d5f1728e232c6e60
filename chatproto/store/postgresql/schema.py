"""The PostgreSQL store's schema: its version and the migrations that build it.

Part of :mod:`chatproto.store.postgresql`; applied by
:meth:`chatproto.store.postgresql.db.PostgresDB.migrate`.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 14

#: Migrations: MIGRATIONS[n] takes a schema at version n to n + 1 (each in one
#: transaction).  Version 1 is the SQLite schema at its version 8, version 2 at its
#: version 9, in PostgreSQL's types; text compares byte by byte (COLLATE "C") as it
#: does in SQLite.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE users (
        name TEXT COLLATE "C" PRIMARY KEY,
        pwhash TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        floor BIGINT NOT NULL DEFAULT 0
    );
    CREATE SEQUENCE items_pos AS BIGINT;
    CREATE TABLE items (
        pos BIGINT PRIMARY KEY,
        id TEXT COLLATE "C" NOT NULL UNIQUE,
        kind TEXT COLLATE "C" NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        recipient TEXT COLLATE "C" NOT NULL,
        conv TEXT COLLATE "C" NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        body TEXT NOT NULL,
        meta TEXT
    );
    ALTER SEQUENCE items_pos OWNED BY items.pos;
    CREATE INDEX items_recipient ON items (recipient, pos);
    CREATE INDEX items_sender ON items (sender, pos);
    CREATE INDEX items_conv ON items (conv, pos);
    CREATE INDEX items_events ON items (pos) WHERE kind = 'event';
    CREATE TABLE acks (
        addr TEXT COLLATE "C" NOT NULL,
        device TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        PRIMARY KEY (addr, device)
    );
    CREATE SEQUENCE outbox_seq AS BIGINT;
    CREATE TABLE outbox (
        seq BIGINT PRIMARY KEY,
        realm TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        payload TEXT
    );
    ALTER SEQUENCE outbox_seq OWNED BY outbox.seq;
    CREATE INDEX outbox_realm ON outbox (realm, seq);
    CREATE TABLE files (
        file_id TEXT COLLATE "C" PRIMARY KEY,
        sha256 TEXT COLLATE "C" NOT NULL,
        size BIGINT NOT NULL,
        name TEXT NOT NULL,
        media_type TEXT NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        recipient TEXT COLLATE "C" NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        pos BIGINT NOT NULL
    );
    CREATE INDEX files_sha256 ON files (sha256);
    CREATE INDEX files_sender ON files (sender);
    CREATE INDEX files_ts ON files (ts);
    CREATE TABLE uploads (
        upload_id TEXT COLLATE "C" PRIMARY KEY,
        user_name TEXT COLLATE "C" NOT NULL,
        record TEXT NOT NULL
    );
    CREATE TABLE settings (
        key TEXT COLLATE "C" PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE requests (
        id TEXT COLLATE "C" PRIMARY KEY,
        actor TEXT COLLATE "C" NOT NULL,
        grp TEXT COLLATE "C" NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX requests_actor ON requests (actor, grp, ts);
    """,
    # v2 (SQLite's v9): an item relayed for a user of another realm carries that
    # realm's signature (JSON); the keys peers announced are cached.
    """
    ALTER TABLE items ADD COLUMN sig TEXT;
    CREATE TABLE peer_keys (
        realm TEXT COLLATE "C" PRIMARY KEY,
        keys TEXT NOT NULL
    );
    """,
    # v3 (SQLite's v10): suspended accounts, named by their floor.
    """
    CREATE TABLE suspensions (
        name TEXT COLLATE "C" PRIMARY KEY,
        floor BIGINT NOT NULL,
        reason TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    );
    """,
    # v4 (SQLite's v11): browser logins (token digests), admins, abuse reports.
    """
    CREATE TABLE session_tokens (
        digest TEXT COLLATE "C" PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL,
        floor BIGINT NOT NULL,
        device TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_used DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX session_tokens_name ON session_tokens (name);
    CREATE TABLE admins (
        name TEXT COLLATE "C" PRIMARY KEY,
        floor BIGINT NOT NULL,
        ts DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE reports (
        id BIGSERIAL PRIMARY KEY,
        reporter TEXT COLLATE "C" NOT NULL,
        msg_id TEXT COLLATE "C" NOT NULL,
        reason TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        sender TEXT COLLATE "C" NOT NULL,
        recipient TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        excerpt TEXT NOT NULL
    );
    CREATE INDEX reports_reporter ON reports (reporter, ts);
    """,
    # v5 (PostgreSQL only; issue 16): several writers.  Each writer's row says "every
    # position I drew up to here is committed" (see PostgresDB.safe_position).
    """
    CREATE TABLE stream_writers (
        writer TEXT COLLATE "C" PRIMARY KEY,
        persisted_upto BIGINT NOT NULL,
        lock_key BIGINT NOT NULL,
        updated DOUBLE PRECISION NOT NULL
    );
    """,
    # v6 (SQLite's v12): items referring to another item (edits, deletes, reactions)
    # are found by the id they refer to.
    """
    CREATE INDEX items_ref ON items ((meta::json ->> 'ref'))
        WHERE kind IN ('edit', 'delete', 'reaction');
    """,
    # v7 (PostgreSQL only; issue 16): the same for the outbox's sequence.
    """
    ALTER TABLE stream_writers ADD COLUMN outbox_upto BIGINT NOT NULL DEFAULT 0;
    """,
    # v8 (SQLite's v13): read markers and per-user preferences.
    """
    CREATE TABLE read_markers (
        conv TEXT COLLATE "C" NOT NULL,
        user_addr TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        PRIMARY KEY (conv, user_addr)
    );
    CREATE INDEX read_markers_user ON read_markers (user_addr);
    CREATE TABLE prefs (
        user_addr TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (user_addr, key)
    );
    """,
    # v9 (SQLite's v14): full-text search.  search_text holds the current text of
    # every text and file item (its latest edit's) as words (runs of letters and
    # digits, as SQLite's tokenizer splits them), kept by a trigger in the item's
    # transaction, with a GIN index of them ('simple': lower-cased, no stemming).
    """
    CREATE TABLE search_text (
        pos BIGINT PRIMARY KEY,
        body TEXT NOT NULL
    );
    CREATE INDEX search_text_words ON search_text USING gin (to_tsvector('simple', body));
    INSERT INTO search_text (pos, body)
        SELECT t.pos, regexp_replace(coalesce((
            SELECT e.body FROM items e WHERE e.kind = 'edit' AND t.kind = 'text'
            AND e.meta::json ->> 'ref' = t.id AND e.conv = t.conv
            AND e.sender = t.sender ORDER BY e.pos DESC LIMIT 1), t.body),
            '[^[:alnum:]]+', ' ', 'g')
        FROM items t WHERE t.kind IN ('text', 'file') AND t.body <> '';
    CREATE FUNCTION items_search() RETURNS trigger LANGUAGE plpgsql
        SET search_path FROM CURRENT AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            IF NEW.kind IN ('text', 'file') AND NEW.body <> '' THEN
                INSERT INTO search_text
                    VALUES (NEW.pos, regexp_replace(NEW.body, '[^[:alnum:]]+', ' ', 'g'));
            ELSIF NEW.kind = 'edit' THEN
                UPDATE search_text s
                    SET body = regexp_replace(NEW.body, '[^[:alnum:]]+', ' ', 'g') FROM items t
                    WHERE s.pos = t.pos AND t.id = (NEW.meta::json ->> 'ref')
                    AND t.conv = NEW.conv AND t.sender = NEW.sender AND t.kind = 'text'
                    AND t.body <> '';
            END IF;
        ELSIF TG_OP = 'UPDATE' THEN
            IF NEW.body = '' THEN
                DELETE FROM search_text WHERE pos = OLD.pos;
            END IF;
        ELSE
            DELETE FROM search_text WHERE pos = OLD.pos;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER items_search AFTER INSERT OR UPDATE OF body OR DELETE ON items
        FOR EACH ROW EXECUTE FUNCTION items_search();
    """,
    # v10 (SQLite's v15): what an edit, delete or reaction refers to, in a table of its
    # own written only for those items (instead of the expression index of v6, which
    # every insert paid for).
    """
    DROP INDEX IF EXISTS items_ref;
    CREATE TABLE IF NOT EXISTS refs (
        ref TEXT COLLATE "C" NOT NULL,
        pos BIGINT NOT NULL,
        PRIMARY KEY (ref, pos)
    );
    INSERT INTO refs
        SELECT meta::json ->> 'ref', pos FROM items
        WHERE kind IN ('edit', 'delete', 'reaction') AND (meta::json ->> 'ref') IS NOT NULL
        ON CONFLICT DO NOTHING;
    """,
    # v11 (SQLite's v17; issue 20): a user's private items are read through the
    # conversations they are in (user_convs, see chatproto/store/userconvs.py) and
    # items_conv; the indexes on sender and recipient, which every insert paid for, go.
    """
    CREATE TABLE IF NOT EXISTS user_convs (
        user_addr TEXT COLLATE "C" NOT NULL,
        conv TEXT COLLATE "C" NOT NULL,
        peer TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (user_addr, conv)
    );
    INSERT INTO user_convs
        SELECT sender, conv, recipient FROM items WHERE substr(recipient, 1, 1) <> '#'
        UNION SELECT recipient, conv, sender FROM items WHERE substr(recipient, 1, 1) <> '#'
        ON CONFLICT DO NOTHING;
    DROP INDEX IF EXISTS items_sender;
    DROP INDEX IF EXISTS items_recipient;
    """,
    # v12 (SQLite's v16; issue 20): items are indexed for search by the store after
    # its commits, in steps (PostgresDB.index_search), not by the trigger of v9: its
    # row in search_text and the GIN index cost every insert as much again as the rest
    # of it.  search_upto: every text and file item up to it is in search_text (all
    # of them, kept by the trigger until now); search reads the items above it
    # directly.  A deletion takes its item's row out in its own transaction.
    """
    DROP TRIGGER IF EXISTS items_search ON items;
    DROP FUNCTION IF EXISTS items_search();
    INSERT INTO settings (key, value)
        SELECT 'search_upto', coalesce(max(pos), 0)::text FROM items
        ON CONFLICT (key) DO UPDATE SET value = excluded.value;
    """,
    # v13 (PostgreSQL only; issue 16): the other realms with a member of each group
    # whose realms a worker of a cluster changed (chatproto/store/grouprealms.py),
    # as of the last such change: a group's items are queued for them in their own
    # transaction.  A row with realm '' says the group is recorded (maybe with no
    # other realm at all).
    """
    CREATE TABLE IF NOT EXISTS group_realms (
        grp TEXT COLLATE "C" NOT NULL,
        realm TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (grp, realm)
    );
    """,
    # v14 (PostgreSQL only; issue 16): outbox rows are numbered from their items'
    # positions (position * 1000000 + k, chatproto/store/postgresql/writers.py), not
    # from a sequence of their own, which workers drew in another order than the
    # positions: the federation sender sends in position order, bounded by the safe
    # position.  The rows queued before keep their seqs; the positions move past
    # them (a gap), so every row queued from now on comes after them.
    """
    SELECT setval('items_pos', greatest(
        (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM items_pos),
        (SELECT max(seq) FROM outbox) / 1000000, 1))
    WHERE EXISTS (SELECT 1 FROM outbox);
    ALTER TABLE stream_writers DROP COLUMN IF EXISTS outbox_upto;
    DROP SEQUENCE IF EXISTS outbox_seq;
    """,
]

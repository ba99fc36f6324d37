-- Moves and removals asked of a running daemon (issue 13). Reservations of
-- uploads in flight live in the daemon's memory, which an admin command in
-- another process cannot see; while a daemon holds the state's lock file,
-- `clients move` and `clients remove` leave a request here, and the daemon
-- applies it beside its reservations and writes the outcome (JSON).
CREATE TABLE admin_requests (
    id           INTEGER PRIMARY KEY,
    kind         TEXT NOT NULL,
    client       TEXT NOT NULL,
    customer     TEXT,
    purge        INTEGER NOT NULL DEFAULT 0,
    requested_at INTEGER NOT NULL,
    claimed_at   INTEGER,
    done_at      INTEGER,
    outcome      TEXT
);
CREATE INDEX admin_requests_open ON admin_requests (id) WHERE done_at IS NULL;

-- Tollgate state, version 1. Times are Unix seconds (UTC); months are
-- "YYYY-MM" in server.timezone. Customer and reseller columns hold names as
-- written in the config.

-- Registered and declared clients. secret_sha256 NULL: declared in the
-- config but never connected, or removed without --purge (registration
-- forgotten, files kept). `used` is the sum of the client's committed files.
CREATE TABLE clients (
    id            TEXT PRIMARY KEY NOT NULL,
    customer      TEXT NOT NULL COLLATE NOCASE,
    kind          TEXT NOT NULL,
    secret_sha256 BLOB,
    declared      INTEGER NOT NULL DEFAULT 0,
    hostname      TEXT,
    registered_at INTEGER,
    last_seen     INTEGER,
    used          INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0)
);
CREATE INDEX clients_by_customer ON clients (customer);

-- Committed bytes per customer, kept with `clients.used` in every commit,
-- delete and move, so quota checks read one row per level.
CREATE TABLE customer_usage (
    customer TEXT PRIMARY KEY NOT NULL COLLATE NOCASE,
    used     INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0)
);

-- The file index LIST reads.
CREATE TABLE files (
    client   TEXT NOT NULL,
    path     TEXT NOT NULL,
    size     INTEGER NOT NULL CHECK (size >= 0),
    sha256   TEXT NOT NULL,
    modified INTEGER NOT NULL,
    PRIMARY KEY (client, path)
);

-- Space held by uploads in flight; all of them are stale after a restart.
CREATE TABLE reservations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    client     TEXT NOT NULL,
    customer   TEXT NOT NULL COLLATE NOCASE,
    size       INTEGER NOT NULL CHECK (size >= 0),
    created_at INTEGER NOT NULL
);
CREATE INDEX reservations_by_client ON reservations (client);
CREATE INDEX reservations_by_customer ON reservations (customer);

-- A commit whose rename may have happened: written before the rename,
-- deleted with the index update, resolved at startup (docs/state.md).
CREATE TABLE pending_commits (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    client      TEXT NOT NULL,
    path        TEXT NOT NULL,
    temp_path   TEXT NOT NULL,
    final_path  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    modified    INTEGER NOT NULL,
    reservation INTEGER,
    created_at  INTEGER NOT NULL
);

-- One row per client per month it was debited; the customer and reseller
-- are those at the time, so debits stay where they were made.
CREATE TABLE mcal_debits (
    client     TEXT NOT NULL,
    month      TEXT NOT NULL,
    cost       INTEGER NOT NULL CHECK (cost >= 0),
    customer   TEXT NOT NULL COLLATE NOCASE,
    reseller   TEXT,
    debited_at INTEGER NOT NULL,
    PRIMARY KEY (client, month)
);
CREATE INDEX mcal_by_customer ON mcal_debits (customer, month);
CREATE INDEX mcal_by_reseller ON mcal_debits (reseller, month);
CREATE INDEX mcal_by_month ON mcal_debits (month);

CREATE TABLE sessions (
    id           TEXT PRIMARY KEY NOT NULL,
    client       TEXT NOT NULL,
    customer     TEXT NOT NULL COLLATE NOCASE,
    schedule     TEXT NOT NULL,
    intent       TEXT NOT NULL,
    peer         TEXT,
    started_at   INTEGER NOT NULL,
    ended_at     INTEGER,
    bytes_in     INTEGER NOT NULL DEFAULT 0,
    bytes_out    INTEGER NOT NULL DEFAULT 0,
    files_ok     INTEGER NOT NULL DEFAULT 0,
    files_failed INTEGER NOT NULL DEFAULT 0,
    result       TEXT
);
CREATE INDEX sessions_by_client ON sessions (client, started_at);

CREATE TABLE refusals (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    client    TEXT NOT NULL,
    customer  TEXT COLLATE NOCASE,
    code      TEXT NOT NULL,
    peer      TEXT
);
CREATE INDEX refusals_by_time ON refusals (at);

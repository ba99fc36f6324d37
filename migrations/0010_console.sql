-- The web console and account details (issue 15).
--
-- One row per customer whose account-details mail was queued when it first
-- appeared in a loaded config (CONFIG.md Semantics: account details), so
-- it is queued once, by one node, and never again on restart.
CREATE TABLE account_details_sent (
    customer  TEXT PRIMARY KEY NOT NULL COLLATE NOCASE,
    outbox_id INTEGER NOT NULL,
    queued_at INTEGER NOT NULL
);

-- Bytes each customer had committed at the end of each local day, for the
-- console's usage charts; pruned under [server.retention] usage.
CREATE TABLE usage_daily (
    day      TEXT NOT NULL,            -- YYYY-MM-DD in server.timezone
    customer TEXT NOT NULL COLLATE NOCASE,
    used     INTEGER NOT NULL,
    at       INTEGER NOT NULL,         -- when it was taken, Unix seconds
    PRIMARY KEY (day, customer)
);

-- The web console and account details (issue 15); see the SQLite
-- migration 0010 for what each table holds.
CREATE TABLE account_details_sent (
    customer  TEXT COLLATE nocase PRIMARY KEY NOT NULL,
    outbox_id BIGINT NOT NULL,
    queued_at BIGINT NOT NULL
);

CREATE TABLE usage_daily (
    day      TEXT NOT NULL,
    customer TEXT COLLATE nocase NOT NULL,
    used     BIGINT NOT NULL,
    at       BIGINT NOT NULL,         -- when it was taken, Unix seconds
    PRIMARY KEY (day, customer)
);

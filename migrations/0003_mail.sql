-- E-mail (CONFIG.md "Email reports", "Alerts"): a persistent outbox, and
-- what was sent, so nothing is sent twice.

-- Every message is written here first, then delivered by a background task
-- with retries; a restart picks up what is left.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at      INTEGER NOT NULL,
    kind            TEXT NOT NULL,          -- session_report | consolidated_report | alert
    subject         TEXT NOT NULL,
    mail_from       TEXT NOT NULL,
    recipients      TEXT NOT NULL,          -- JSON array of addresses
    message         BLOB NOT NULL,          -- the RFC 5322 message
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    sent_at         INTEGER
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE sent_at IS NULL;

-- One row per consolidated report queued: (customer, frequency, first day).
CREATE TABLE reports_sent (
    customer  TEXT NOT NULL COLLATE NOCASE,
    frequency TEXT NOT NULL,
    period    TEXT NOT NULL,
    outbox_id INTEGER NOT NULL,
    queued_at INTEGER NOT NULL,
    PRIMARY KEY (customer, frequency, period)
);

-- One row per alert queued: at most one per subject per local day.
CREATE TABLE alerts_sent (
    subject   TEXT NOT NULL,
    day       TEXT NOT NULL,
    outbox_id INTEGER NOT NULL,
    queued_at INTEGER NOT NULL,
    PRIMARY KEY (subject, day)
);

CREATE INDEX sessions_by_customer ON sessions (customer, started_at);

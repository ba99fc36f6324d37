-- Session reports (CONFIG.md "Email reports", issue 12): a finished
-- session's facts wait here, one row per recipient, and go out coalesced:
-- at most one mail per (recipient, client) per report_interval, listing
-- every session since the last one. Written in the transaction that
-- records the session's end, so a crash loses none.
CREATE TABLE session_reports (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient TEXT NOT NULL,
    client    TEXT NOT NULL,
    facts     TEXT NOT NULL,     -- JSON of reports::SessionFacts
    ended_at  INTEGER NOT NULL
);
CREATE INDEX session_reports_by_pair ON session_reports (recipient, client, id);

-- When the last session mail went to a recipient about a client.
CREATE TABLE session_digests (
    recipient TEXT NOT NULL,
    client    TEXT NOT NULL,
    sent_at   INTEGER NOT NULL,
    PRIMARY KEY (recipient, client)
);

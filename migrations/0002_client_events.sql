-- Moves and removals made by the admin commands, for the running daemon to
-- apply to live sessions (it polls for rows after the last one it saw).
CREATE TABLE client_events (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,
    client   TEXT NOT NULL,
    kind     TEXT NOT NULL,          -- 'moved' or 'removed'
    customer TEXT COLLATE NOCASE     -- the new customer, for 'moved'
);

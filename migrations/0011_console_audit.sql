-- Changes made through the web console (issue 16): who, what, when, and
-- the file written. Pruned under [server.retention] audit.
CREATE TABLE console_audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       INTEGER NOT NULL,         -- Unix seconds
    login    TEXT NOT NULL,            -- "admin", "reseller acme"
    username TEXT NOT NULL,            -- the web user name
    action   TEXT NOT NULL,            -- add, edit, deactivate, activate
    customer TEXT NOT NULL,
    file     TEXT NOT NULL,
    detail   TEXT NOT NULL
);
CREATE INDEX console_audit_at ON console_audit (at);

-- Who gets in, under attack (PROTOCOL.md and CONFIG.md, Additions of
-- 2026-11-30).

-- A client removed without --purge keeps its id reserved until an
-- administrator readmits it; `clients readmit` stores a one-time key here.
ALTER TABLE clients ADD COLUMN removed_at INTEGER;
ALTER TABLE clients ADD COLUMN readmit_sha256 BLOB;
ALTER TABLE clients ADD COLUMN readmit_expires INTEGER;
-- Rows removed before this migration with their files kept: registered
-- clients without a secret (a purge deleted the row). Declared clients
-- removed before cannot be told from purged ones, so they keep enrolling
-- with their customer's key, as they did.
UPDATE clients SET removed_at = COALESCE(last_seen, 0)
 WHERE secret_sha256 IS NULL AND declared = 0;

-- Client ids are unique without regard to case: PC-1 and pc-1 would share
-- a directory on a case-insensitive filesystem.
CREATE UNIQUE INDEX clients_id_nocase ON clients (id COLLATE NOCASE);
-- registrations_per_minute counts a customer's recent registrations.
CREATE INDEX clients_registered ON clients (customer, registered_at);

-- Refusals: one row per (source, code, customer, minute), with a count,
-- so a flood of refused HELLOs cannot grow the database. `client` is the
-- last valid client id seen in that row, or '(invalid)'; `customer` is ''
-- when none was known. Nothing a peer sends is stored beyond 256 bytes.
CREATE TABLE refusals_v2 (
    at       INTEGER NOT NULL,   -- the minute's start, Unix seconds
    source   TEXT NOT NULL,      -- the peer's IP address, '' if unknown
    code     TEXT NOT NULL,
    customer TEXT NOT NULL COLLATE NOCASE,
    client   TEXT NOT NULL,
    count    INTEGER NOT NULL CHECK (count > 0),
    PRIMARY KEY (at, source, code, customer)
);
INSERT INTO refusals_v2 (at, source, code, customer, client, count)
SELECT at / 60 * 60,
       CASE
         WHEN peer IS NULL THEN ''
         WHEN instr(peer, ']') > 0 THEN substr(peer, 2, instr(peer, ']') - 2)
         WHEN instr(peer, ':') > 0 THEN substr(peer, 1, instr(peer, ':') - 1)
         ELSE substr(peer, 1, 64)
       END,
       code,
       substr(COALESCE(customer, ''), 1, 256),
       MAX(CASE
             WHEN length(client) BETWEEN 1 AND 64 AND client NOT GLOB '*[^A-Za-z0-9._-]*'
                  AND client NOT GLOB '.*' THEN client
             ELSE '(invalid)'
           END),
       COUNT(*)
  FROM refusals
 GROUP BY 1, 2, 3, 4;
DROP TABLE refusals;
ALTER TABLE refusals_v2 RENAME TO refusals;
CREATE INDEX refusals_by_client ON refusals (client, at);

-- Retention pruning (CONFIG.md [server.retention]) deletes by age.
CREATE INDEX sessions_by_start ON sessions (started_at);
CREATE INDEX client_events_by_time ON client_events (at);
CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;
CREATE INDEX alerts_by_time ON alerts_sent (queued_at);

-- Consolidated reports cover real time (issue 12 item 5).
--
-- When each customer first appeared in state: no report covers a period
-- that began before. Seeded from the earliest registration of its clients;
-- the daemon adds every configured customer it has not seen yet.
CREATE TABLE customers_seen (
    name       TEXT PRIMARY KEY NOT NULL COLLATE NOCASE,
    first_seen INTEGER NOT NULL
);
INSERT INTO customers_seen (name, first_seen)
SELECT customer, MIN(registered_at) FROM clients
 WHERE registered_at IS NOT NULL
 GROUP BY customer;

-- The client's committed bytes when the session ended, so a report can
-- give what was stored as of its period's end.
ALTER TABLE sessions ADD COLUMN stored_after INTEGER;

-- A random number each process draws when it starts as a node: a second
-- process started under the same name takes the name over, and the first
-- learns it at its next heartbeat or reservation instead of sharing the
-- lease (and the holds) with it.
ALTER TABLE nodes ADD COLUMN incarnation BIGINT NOT NULL DEFAULT 0;

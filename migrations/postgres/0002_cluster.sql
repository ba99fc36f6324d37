-- Several nodes on one database (issue 14). Not in the SQLite schema:
-- a single node keeps these in memory (src/state/ledger.rs), and
-- `state migrate` does not copy them (they never outlive a node's run).

-- Each node and its lease, in milliseconds of the database's clock (one
-- clock for every node). A node renews `expires_ms` with its heartbeat;
-- once it has passed, the node counts as dead: what it held is ignored at
-- once, and deleted by the next reclaim.
CREATE TABLE nodes (
    name       TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    started_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);

-- Space held by uploads in flight, one row per upload, with the node that
-- holds it: the cluster's ledger. Live while its node's lease is.
CREATE TABLE held (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node       TEXT COLLATE "C" NOT NULL,
    client     TEXT COLLATE "C" NOT NULL,
    customer   TEXT COLLATE nocase NOT NULL,
    size       BIGINT NOT NULL CHECK (size >= 0),
    created_at BIGINT NOT NULL
);
CREATE INDEX held_by_node ON held (node);
CREATE INDEX held_by_client ON held (client);
CREATE INDEX held_by_customer ON held (customer);

-- Work done once across the nodes (issue 14). PostgreSQL's own, like
-- 0002: not in the SQLite schema, not copied by `state migrate`.

-- Which node is sending which outbox message, until when (milliseconds of
-- the database's clock). A claim past its expiry may be taken by another
-- node: delivery is at least once when a node stalls past its lease.
CREATE TABLE outbox_claims (
    id         BIGINT PRIMARY KEY NOT NULL,
    node       TEXT COLLATE "C" NOT NULL,
    expires_ms BIGINT NOT NULL
);

-- A periodic job's run for one period (a consolidated report's day, a
-- pruning round): the node that runs it, its claim's token (a later claim
-- by the same node has another), its lease, and when it finished. One row
-- per (job, period), so each is done once across the cluster.
CREATE TABLE cluster_runs (
    job        TEXT COLLATE "C" NOT NULL,
    period     TEXT COLLATE "C" NOT NULL,
    node       TEXT COLLATE "C" NOT NULL,
    token      BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    done_ms    BIGINT,
    PRIMARY KEY (job, period)
);

-- Aggregate caps shared by the nodes (issue 14 item 3; PostgreSQL's own,
-- like 0002). One row per (cap, node): what the node's sessions under the
-- cap want, and the share it was granted until `expires_ms` (the
-- database's clock). Grants in force never sum past the cap
-- (src/policy/shares.rs); a node that stops refreshing drops out when its
-- grant expires.
CREATE TABLE cap_shares (
    cap        TEXT COLLATE nocase NOT NULL,  -- its lock is case-folded too
    node       TEXT COLLATE "C" NOT NULL,
    wants      BIGINT NOT NULL CHECK (wants >= 0),
    granted    BIGINT NOT NULL CHECK (granted >= 0),
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (cap, node)
);

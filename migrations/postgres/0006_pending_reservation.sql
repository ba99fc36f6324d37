-- Holds a pending commit rests on count whatever their node's lease, and
-- are not reclaimed (src/state/postgres/mod.rs, LIVE_HOLD): looked up by
-- reservation.
CREATE INDEX pending_commits_by_reservation ON pending_commits (reservation);

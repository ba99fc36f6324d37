-- File metadata (PROTOCOL.md Additions, "File metadata"): PUT may carry
-- `mode` (permission bits) and `mtime` (RFC 3339); both are stored and
-- returned in LISTING and FILE, NULL where a PUT had none. A pending
-- commit carries them too, so a commit rolled forward after a crash keeps
-- them.
ALTER TABLE files ADD COLUMN mode INTEGER;
ALTER TABLE files ADD COLUMN mtime TEXT;
ALTER TABLE pending_commits ADD COLUMN mode INTEGER;
ALTER TABLE pending_commits ADD COLUMN mtime TEXT;

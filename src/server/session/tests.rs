//! Session phases over tokio::io::duplex on the paused clock.

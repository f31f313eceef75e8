"""Ground truth from PostgreSQL itself: real WAL from a real server, and its own recovery of the same pages."""

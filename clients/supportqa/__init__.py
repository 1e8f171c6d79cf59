"""supportqa client library."""

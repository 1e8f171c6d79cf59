"""supportqa server."""

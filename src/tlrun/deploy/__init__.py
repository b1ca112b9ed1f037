"""Production: service unit export and the restart policy."""

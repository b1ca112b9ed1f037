"""The launch path every command shares: guard -> sweep -> spawn -> verify -> supervise."""

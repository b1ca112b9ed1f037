"""Bounds shared by the command line and the settings (imported by `tlrun --help`: keep it free of imports)."""

MAX_SECONDS = 7 * 24 * 3600.0  # no duration tlrun takes is longer than a week (timers overflow past ~1e9 s)

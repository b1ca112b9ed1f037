"""Across hosts, through the broker: the beat lease, the cluster view, consumption checks."""

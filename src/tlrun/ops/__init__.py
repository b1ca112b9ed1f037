"""The everyday controls: the local inventory, doctor, stop and health, metrics."""

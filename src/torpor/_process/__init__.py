"""Managed processes: launching, restoring, the keeper, self-dumps."""

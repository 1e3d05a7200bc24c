"""Fault injection: SIGKILL and full disks at every stage of checkpoint, restore and push, with
torpor's invariants checked after each (root and real CRIU, like tests/integration)."""

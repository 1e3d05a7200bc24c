"""Supervision: periodic checkpoints into a pool, automatic restore after a crash, resume after
the host dies, failover through a shared pool with fencing (see docs/supervision.md).

- :mod:`._spec`: what a supervised process is to be (command, interval, keep, pool, policy);
- :mod:`._state`, :mod:`._events`: what happened to it, on disk in the home;
- :mod:`._series`: its checkpoints in a pool, pruning, the spec beside them;
- :mod:`._lease`: the fence (the store's own lock primitive) that keeps one live copy;
- :mod:`._policy`: when to restore, from which checkpoint, when to give up (pure logic);
- :mod:`._daemon`: the home's supervisor, which runs all of the above.

Modules are imported directly (nothing here): the leaf :mod:`._spec` is read by the checkpoint
commit paths, which must not pull in the rest.
"""

"""Instant restore: post-copy (lazy) memory, from a local image or straight from a pool.

- :mod:`._source`: a page source (an image directory, or a pool record whose page chunks are
  fetched on demand and verified before a byte reaches the process);
- :mod:`._server`: torpor's page server, speaking CRIU's page protocol to ``criu lazy-pages``,
  to that daemon alone; it records the pages asked for (the warm set);
- :mod:`._restore`: a lazy restore: the daemon, the restore, the watch that kills a copy
  whose memory can no longer arrive.

Modules are imported directly (nothing here).
"""

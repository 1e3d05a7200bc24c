"""The checkpoint engine: CRIU over RPC. Contract for the rest of torpor:

- :class:`CriuEngine` ``.dump(pid, dir, DumpOptions, notify=, connection=)`` → :class:`DumpResult`
- ``.restore(dir, RestoreOptions, notify=, connection=)`` → :class:`RestoreResult`
- ``.version()``, ``.check()``, ``.features()``
- a self-dump asked for by a keeper: :func:`dump_request` (the keeper's side) and
  :func:`receive_dump` (the dumped process's side); ``criu swrk`` started by :func:`start_swrk`
- failures raise :class:`~torpor.DumpError` / :class:`~torpor.RestoreError` (with log lines)
"""

from ._criu import (
    DUMP_LOG as DUMP_LOG,
)
from ._criu import (
    CriuEngine as CriuEngine,
)
from ._criu import (
    CriuVersion as CriuVersion,
)
from ._criu import (
    DumpOptions as DumpOptions,
)
from ._criu import (
    DumpResult as DumpResult,
)
from ._criu import (
    Features as Features,
)
from ._criu import (
    RestoreOptions as RestoreOptions,
)
from ._criu import (
    RestoreResult as RestoreResult,
)
from ._criu import (
    criu_version as criu_version,
)
from ._criu import (
    dump_request as dump_request,
)
from ._criu import (
    find_criu as find_criu,
)
from ._criu import (
    log_errors as log_errors,
)
from ._criu import (
    receive_dump as receive_dump,
)
from ._rpc import (
    Connection as Connection,
)
from ._rpc import (
    NotifyEvent as NotifyEvent,
)
from ._rpc import (
    NotifyHandler as NotifyHandler,
)
from ._rpc import (
    start_swrk as start_swrk,
)

"""A lazy copy's page server, as the orchestration (``_restore``) sees it: what it needs of
one, and how one is made over a page source (``_server.PageServer``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .._images._image import Image
from ._source import LazyPageError, PageSource, Range


class Server(Protocol):
    """What the orchestration needs of a page server (``_lazy._server.PageServer``)."""

    @property
    def port(self) -> int: ...

    @property
    def error(self) -> LazyPageError | None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...

    def warm_set(self, *, within: float | None = None) -> list[Range]: ...

    def prefetch(self, ranges: list[Range]) -> None: ...


# Makes the page server of a copy: (image, the daemon's pid once known, called on a serving
# error before the daemon's connection is closed). None: CRIU serves the image dir itself.
ServerFactory = Callable[[Image, Callable[[], int | None], Callable[[LazyPageError], None]], Server]


def served_from(source: Callable[[Image], PageSource]) -> ServerFactory:
    """A :data:`ServerFactory` of torpor's page server reading from ``source(image)``."""
    from ._server import PageServer

    def make(
        image: Image,
        daemon_pid: Callable[[], int | None],
        on_error: Callable[[LazyPageError], None],
    ) -> Server:
        src = source(image)
        try:
            return _Served(
                PageServer(image.path, src, allowed_pid=daemon_pid, on_error=on_error), src
            )
        except BaseException:
            src.close()
            raise

    return make


class _Served:
    """A page server that closes its source with it."""

    def __init__(self, server: Any, source: PageSource) -> None:
        self._server = server
        self._source = source

    @property
    def port(self) -> int:
        return int(self._server.port)

    @property
    def error(self) -> LazyPageError | None:
        err: LazyPageError | None = self._server.error
        return err

    def start(self) -> None:
        self._server.start()

    def close(self) -> None:
        try:
            self._server.close()
        finally:
            self._source.close()

    def warm_set(self, *, within: float | None = None) -> list[Range]:
        ranges: list[Range] = self._server.warm_set(within=within)
        return ranges

    def prefetch(self, ranges: list[Range]) -> None:
        self._source.prefetch(ranges)


def local_pages(image: Image) -> PageSource:
    """A local image's verified pages (``_source.local_source``)."""
    from ._source import local_source

    return local_source(image)

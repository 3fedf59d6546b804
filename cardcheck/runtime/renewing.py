"""A client channel that follows its certificate: grpc fixes a channel's credentials when it is
made, so when the TLS files change (cert-manager renewed the service's certificate) the next
call opens a new channel on the new files, and the old one is closed once its calls are done.

The files are looked at (a stat each) at most every `check_every_s`, on a call; a call is made
on the channel current when it starts. Stubs are made once over this channel as over any other:
each multicallable it hands out finds the current channel at call time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from cardcheck.runtime.tls import ChangedFiles, TlsFiles

RETIRED_GRACE_S = 60.0  # calls under way on a replaced channel get this long before it closes


class _Renewing:
    """One method's multicallable over whatever channel is current."""

    def __init__(self, owner: RenewingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._kwargs = kwargs
        self._made: tuple[grpc.aio.Channel, Any] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        made = self._made
        if made is None or made[0] is not channel:
            made = (channel, getattr(channel, self._kind)(*self._args, **self._kwargs))
            self._made = made
        return made[1](*args, **kwargs)


class RenewingChannel(grpc.aio.Channel):
    def __init__(
        self,
        files: TlsFiles,
        make_credentials: Callable[[TlsFiles], grpc.ChannelCredentials],
        open_channel: Callable[[grpc.ChannelCredentials], grpc.aio.Channel],
        *,
        check_every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`make_credentials(files)` raises (ValueError, OSError) on files it cannot use, at
        start; later such files keep the current channel until they can be used."""
        self._credentials = ChangedFiles(files, make_credentials)  # first: it says what is wrong
        self._open = open_channel
        self._every = check_every_s
        self._clock = clock
        self._channel = open_channel(self._credentials.current)
        self._next_check = clock() + check_every_s
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def renewals(self) -> int:
        return self._credentials.changes

    def current(self) -> grpc.aio.Channel:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._every
            self._renew_if_changed()
        return self._channel

    def _renew_if_changed(self) -> None:
        credentials = self._credentials.rebuilt()
        if credentials is None:
            return
        old, self._channel = self._channel, self._open(credentials)  # calls go on a new channel
        task = asyncio.get_running_loop().create_task(old.close(RETIRED_GRACE_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- grpc.aio.Channel ------------------------------------------------------------------

    async def __aenter__(self) -> RenewingChannel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current().channel_ready()

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Renewing(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Renewing(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Renewing(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Renewing(self, "stream_stream", args, kwargs)

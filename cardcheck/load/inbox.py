"""Codes and notices read from notifier's sandbox inbox (ListMessages), as a phone would show
them. Only a sandbox mesh has the inbox; each phone's messages seen so far are remembered, so
a new code is told from old ones without listing the inbox before each request."""

from __future__ import annotations

import asyncio
import re

import grpc

from cardcheck.v1 import notifier_pb2, notifier_pb2_grpc

SMS_CODE = re.compile(r"(?<!\d)\d{6}(?!\d)")
FIRST_POLL_S = 0.02
MAX_POLL_S = 0.25


class NoMessage(Exception):
    """The message never arrived within the wait."""


class Inbox:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0) -> None:
        self._stub = notifier_pb2_grpc.NotifierStub(channel)
        self.timeout_s = timeout_s
        self._seen: dict[str, set[str]] = {}

    async def _list(self, phone: str) -> list[notifier_pb2.Message]:
        reply = await self._stub.ListMessages(notifier_pb2.ListMessagesRequest(phone=phone), timeout=10)
        return list(reply.messages)

    async def remember(self, phone: str) -> None:
        """Takes note of what the phone holds already (before its first code of this run)."""
        if phone not in self._seen:
            self._seen[phone] = {m.message_id for m in await self._list(phone)}

    async def next_message(self, phone: str, kind: str) -> notifier_pb2.Message:
        """The newest unseen message of `kind` (older unseen ones are passed over: a code asked
        for again replaces them), waiting for one to come (NoMessage). `remember` the phone
        before asking for the message, or what came before counts as new."""
        seen = self._seen.setdefault(phone, set())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        pause = FIRST_POLL_S
        while True:
            messages = await self._list(phone)
            fresh = [m for m in messages if m.message_id not in seen and m.kind == kind]  # newest first
            if fresh:
                seen.update(m.message_id for m in fresh)
                return fresh[0]
            if loop.time() + pause > deadline:
                raise NoMessage(f"no {kind} message within {self.timeout_s:g} s")
            await asyncio.sleep(pause)
            pause = min(MAX_POLL_S, pause * 1.5)

    async def next_code(self, phone: str) -> str:
        message = await self.next_message(phone, "SMS_CODE")
        match = SMS_CODE.search(message.body)
        if match is None:
            raise NoMessage(f"no 6-digit code in message {message.message_id}")
        return match.group()

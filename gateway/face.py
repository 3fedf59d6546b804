"""Face verification before each query. Only the sandbox provider exists: without sandbox mode
there is nothing to verify faces with, so the gateway refuses to start."""

from __future__ import annotations

import hmac
from typing import Protocol

from cardcheck.runtime.settings import Settings, SettingsError

SANDBOX_PASS = "sandbox:pass"


class FaceVerifier(Protocol):
    async def verify(self, user_id: str, face_token: str) -> bool:
        """Does the liveness/face token prove that this user is the one in front of the camera?"""
        ...


class SandboxFaceVerifier:
    """The sandbox identity of docs/api.md: exactly `sandbox:pass` passes, anything else fails."""

    async def verify(self, user_id: str, face_token: str) -> bool:
        return hmac.compare_digest(face_token.encode(), SANDBOX_PASS.encode())


def face_verifier_for(settings: Settings) -> FaceVerifier:
    if settings.sandbox:
        return SandboxFaceVerifier()
    raise SettingsError(
        "CARDCHECK_SANDBOX is off but no production face-verification provider is configured; "
        "the gateway refuses to start"
    )

"""Production mode (CARDCHECK_SANDBOX=false): a service starts only with everything it needs to
touch real people's data. Each service names what it lacks, one line per missing piece, and
exits 2 (`serve_main`), instead of starting on plaintext hops or on a sandbox stand-in."""

from __future__ import annotations

from collections.abc import Iterable

from cardcheck.runtime.settings import Settings, SettingsError


class NotReadyForProduction(SettingsError):
    """What a service lacks outside sandbox, a line each in `missing`."""

    def __init__(self, missing: Iterable[str]) -> None:
        self.missing = list(missing)
        super().__init__("\n".join(self.missing))


def require_ready(settings: Settings, service: str, *own: Iterable[str]) -> None:
    """Outside sandbox: raises NotReadyForProduction naming the TLS material `service` lacks and
    the `own` missing pieces (its providers'). In sandbox mode: nothing to check."""
    if settings.sandbox:
        return
    missing = [*settings.tls_missing(service), *(line for lines in own for line in lines)]
    if missing:
        raise NotReadyForProduction(missing)

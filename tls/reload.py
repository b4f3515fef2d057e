"""Hot reload of certificate files: new handshakes get renewed certificates.

Certificate managers (cert-manager, certbot, a developer re-running
``pgwake up``) replace files in place. The reloader notices a changed file
stamp, builds a fresh SSLContext and swaps it into ``ServerTLS``; live
connections keep the context they were accepted with. A broken replacement
is logged once and the previous certificate stays in service.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from tls.certs import FileStamp, load_certificate
from tls.context import ServerTLS, certificate_context


class CertificateReloader:
    """Watches the files behind each certificate of a ``ServerTLS``."""

    def __init__(self, server_tls: ServerTLS, logger: logging.Logger | None = None) -> None:
        self._server_tls = server_tls
        self._logger = logger or logging.getLogger(__name__)
        # Stamps already reported as broken, so a bad file is logged once
        # rather than every interval until someone fixes it.
        # None stands for "files missing".
        self._reported_failures: dict[int, FileStamp | None] = {}

    def check(self) -> bool:
        """Reload every certificate whose files changed; True if any was swapped in."""
        reloaded = False
        for index, current in enumerate(self._server_tls.certificates):
            pair = current.cert.pair
            try:
                stamp = FileStamp.of(pair)
            except OSError as error:
                self._report_failure(index, None, f"cannot stat {pair.cert} / {pair.key}: {error}")
                continue
            if stamp == current.cert.stamp:
                continue
            try:
                replacement = certificate_context(load_certificate(pair))
            except (OSError, ValueError, ssl.SSLError) as error:
                self._report_failure(index, stamp, f"keeping the previous {pair.cert}: {error}")
                continue
            self._server_tls.replace(index, replacement)
            self._reported_failures.pop(index, None)
            self._logger.info(
                "reloaded %s (names %s, expires %s)",
                pair.cert,
                ", ".join(replacement.cert.dns_names),
                replacement.cert.not_after.isoformat(),
            )
            reloaded = True
        return reloaded

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Check now, then every ``interval`` seconds, until ``stop`` is set."""
        while True:
            self.check()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                continue
            return

    def _report_failure(self, index: int, stamp: FileStamp | None, message: str) -> None:
        if index in self._reported_failures and self._reported_failures[index] == stamp:
            return
        self._reported_failures[index] = stamp
        self._logger.warning("certificate reload failed: %s", message)

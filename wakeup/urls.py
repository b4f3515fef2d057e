"""Connection URLs handed to users: the SNI form and the `options=endpoint=` form."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


@dataclass(frozen=True)
class PublicAddress:
    """Where clients reach the proxy, as users should write it in a URL."""

    domain: str
    host: str  # for the no-SNI form (an IP or a name)
    port: int
    ca_file: Path | None = None  # the dev CA, for sslmode=verify-full

    def url(self, endpoint_id: str, user: str, password: str | None, database: str) -> str:
        query = ["sslmode=verify-full" if self.ca_file else "sslmode=require"]
        if self.ca_file:
            query.append(f"sslrootcert={quote(str(self.ca_file), safe='/')}")
        # `.localhost` names do not resolve everywhere; pin the address so the
        # URL works as printed while SNI and the certificate check still use the name.
        if self.domain.endswith("localhost"):
            query.append(f"hostaddr={self.host}")
        return self._format(f"{endpoint_id}.{self.domain}", user, password, database, query)

    def url_no_sni(self, endpoint_id: str, user: str, password: str | None, database: str) -> str:
        query = ["sslmode=require", f"options={quote(f'endpoint={endpoint_id}', safe='')}"]
        return self._format(self.host, user, password, database, query)

    def _format(
        self, host: str, user: str, password: str | None, database: str, query: list[str]
    ) -> str:
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        netloc_host = f"[{host}]" if ":" in host else host
        return f"postgresql://{auth}@{netloc_host}:{self.port}/{database}?{'&'.join(query)}"

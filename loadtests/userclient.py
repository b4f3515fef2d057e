"""What a user's program does, in its own process, with stock libraries: the measuring side
of `connect --scenario pool` and `--scenario suspended`.

    python -m loadtests.userclient create API_URL API_KEY [RUNS SPACING_S]
        # POST (urllib), then psycopg over TLS with url_no_sni, select 1; RUNS times
    python -m loadtests.userclient connect URL               # psycopg TLS, select 1
    (--timing: also ask the proxy for its connect-time breakdown, pgwake_timing=on)

Prints one JSON object per run: milliseconds for each step and the total, as this
process saw them.
Imports happen before the clock starts.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

import psycopg

TIMING = "--timing"  # ask the proxy for its breakdown too (options=pgwake_timing=on)


def with_timing(url: str) -> str:
    return url.replace("options=endpoint%3D", "options=pgwake_timing%3Don%20endpoint%3D")


def first_row(conninfo: str) -> str | None:
    """Connect, select 1, close; the proxy's pgwake.timing when it sent one."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("select 1").fetchone()
        assert row == (1,), row
        return conn.info.parameter_status("pgwake.timing")


def create(api_url: str, api_key: str, timing: bool) -> dict[str, object]:
    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/v1/endpoints", data=b"{}", method="POST",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        created = json.loads(response.read())
    posted = time.perf_counter()
    url = created["url_no_sni"]
    breakdown = first_row(with_timing(url) if timing else url)
    done = time.perf_counter()
    return {"id": created["id"], "cold_start": created["cold_start"],
            "post_ms": (posted - started) * 1000, "connect_ms": (done - posted) * 1000,
            "total_ms": (done - started) * 1000, "proxy_timing": breakdown}


def connect(conninfo: str, timing: bool) -> dict[str, object]:
    started = time.perf_counter()
    breakdown = first_row(with_timing(conninfo) if timing else conninfo)
    return {"total_ms": (time.perf_counter() - started) * 1000, "proxy_timing": breakdown}


def main(argv: list[str]) -> int:
    timing = TIMING in argv
    argv = [a for a in argv if a != TIMING]
    if argv[:1] == ["create"] and len(argv) in (3, 5):
        runs, spacing = (int(argv[3]), float(argv[4])) if len(argv) == 5 else (1, 0.0)
        for i in range(runs):
            if i:
                time.sleep(spacing)  # a user's pace, as in the measurement
            print(json.dumps(create(argv[1], argv[2], timing)), flush=True)
    elif argv[:1] == ["connect"] and len(argv) == 2:
        print(json.dumps(connect(argv[1], timing)), flush=True)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

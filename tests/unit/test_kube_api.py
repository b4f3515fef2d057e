"""The Kubernetes adapter's one retry policy: exponential backoff with full jitter."""

from __future__ import annotations

from wakeup.provisioners.k8s_api import Backoff, Conflict, Gone, KubeError, NotFound, _error


def test_backoff_grows_is_capped_and_jittered() -> None:
    b = Backoff(initial=0.1, maximum=2.0, factor=2.0)
    assert [b.delay(n, rng=lambda: 1.0) for n in range(7)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert b.delay(3, rng=lambda: 0.0) == 0.0
    assert 0.0 <= b.delay(3) <= 0.8


def test_status_codes_map_to_errors() -> None:
    assert isinstance(_error(404, "x"), NotFound)
    assert isinstance(_error(409, "x"), Conflict)
    assert isinstance(_error(410, "x"), Gone)
    assert type(_error(403, "x")) is KubeError

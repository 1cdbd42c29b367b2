"""Schemathesis over the OpenAPI document: no operation answers 5xx, whatever the input.

A bounded run against the ASGI app (access control off, /cog on, the real pgstac and COG
server): a few generated cases per operation, with the path identifiers pinned to data
that exists (the sample collection, item, asset and a registered search) so that the
generated query parameters reach the readers instead of stopping at a 404.
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import make_settings
from tiler.main import create_app

C = "spot67-demo"
MAX_EXAMPLES = 3
BUDGET_S = 100.0


@pytest.fixture(scope="module")
def pins(client, sample) -> dict[str, str]:
    """Path identifiers of data that exists."""
    r = client.post("/searches/register", json={"collections": [C]})
    assert r.status_code == 200, r.text
    return {"collection_id": C, "item_id": sample.item(0)["id"], "asset_id": "ms", "search_id": r.json()["id"]}


@pytest.fixture(scope="module")
def api_schema(dsn, cog_server):
    """Its own app: schemathesis runs the app's lifespan and ends it after the test (closing the
    pool), which must not close the session app's pool under the other tests."""
    app = create_app(make_settings(dsn, enabled=True, allowed_prefixes=[cog_server.url + "/"]))
    return schemathesis.openapi.from_asgi("/api", app)


def test_no_server_error(api_schema, pins):
    """Each operation: a few generated cases, each must not be a 5xx (and the run is bounded)."""
    started = time.monotonic()
    failures: dict[str, str] = {}
    calls = [0]
    statuses: dict[int, int] = {}
    slow: list[tuple[float, str]] = []
    operations = [r.ok() for r in api_schema.get_all_operations() if hasattr(r, "ok")]
    assert len(operations) > 100

    for operation in operations:
        if time.monotonic() - started > BUDGET_S:
            break
        op_started = time.monotonic()
        print(f"schemathesis: {operation.label}", flush=True)

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case):
            calls[0] += 1
            for name, value in pins.items():
                if name in (case.path_parameters or {}):
                    case.path_parameters[name] = value
            try:
                response = case.call(timeout=30)  # a hang is a finding too
                statuses[response.status_code // 100] = statuses.get(response.status_code // 100, 0) + 1
                case.validate_response(response, checks=[not_a_server_error])
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - collect every failing operation
                failures.setdefault(case.operation.label, f"{case.as_curl_command()}\n{type(e).__name__}: {str(e)[:500]}")

        run()
        slow.append((time.monotonic() - op_started, operation.label))

    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {len(operations)} operations, {calls[0]} calls in {elapsed:.0f} s; slowest:")
    for t, label in sorted(slow, reverse=True)[:5]:
        print(f"  {t:5.1f} s  {label}")
    print(f"  answers by class: {dict(sorted((f'{k}xx', v) for k, v in statuses.items()))}")
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    assert elapsed < BUDGET_S + 30
    assert statuses.get(2, 0) > 50  # the generated requests do reach the data, not only 4xx

"""Schemathesis against the API's own document (``/openapi.json``): every operation with a valid API key, and
sequences that follow one answer's ids into the next request (links schemathesis infers from the document).

Every response must be documented (status, content type, headers such as ``Allow``), match its schema, and none
may be a 500. Schema-valid requests must be accepted, except where acceptance depends on more than the document
can say: a job's image refs must name the tenant's own uploads and its webhook URL a public address (the submits
answer 422), an upload must be an image judged by its bytes (415), an adapter a LoRA .safetensors file for the served
model (415 / 422) or a URL the service may fetch (422). Bounded: a handful of examples each.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import run_state_machine_as_test
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.main import create_app
from core.admin import create_key
from core.settings import Settings

# The document, from an app that is built but never started (building one connects to nothing).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())

# Operations whose acceptance of a schema-valid request depends on what the document cannot express.
_SEMANTIC = {"POST /v1/jobs", "POST /v1/batches", "POST /v1/uploads", "POST /v1/adapters"}
_SETTINGS = hypothesis_settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def live(settings: Settings) -> Iterator[tuple[Any, dict[str, str]]]:
    """The app (its lifespan run by schemathesis on first use) and a tenant's auth header."""
    app = create_app(settings, run_sweeper=False)
    yield app, {"Authorization": f"Bearer {create_key(settings, 'fuzz')}"}
    schemathesis_asgi.shutdown_lifespans()


def _excluded(case: Any) -> list[Any]:
    return [positive_data_acceptance] if f"{case.method} {case.path}" in _SEMANTIC else []


@schema.parametrize()
@_SETTINGS
def test_every_operation(case: Any, live: tuple[Any, dict[str, str]]) -> None:
    app, headers = live
    case.call_and_validate(app=app, headers=headers, excluded_checks=_excluded(case))


def test_sequences_that_follow_ids(live: tuple[Any, dict[str, str]]) -> None:
    app, headers = live

    class Sequences(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"app": app, "headers": headers}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, headers=headers, excluded_checks=_excluded(case))

    run_state_machine_as_test(
        Sequences,
        settings=hypothesis_settings(
            max_examples=8, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck), database=None
        ),
    )


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/jobs", {"prompt": "replayed"}), ("/v1/batches", {"jobs": [{"prompt": "r"}]})]
)
def test_an_idempotent_replay_is_documented(live: tuple[Any, dict[str, str]], path: str, body: dict[str, Any]) -> None:
    app, headers = live
    case = schema[path]["POST"].Case(
        body=body, headers={"Idempotency-Key": f"replay{path}"}, media_type="application/json"
    )
    statuses = [case.call_and_validate(app=app, headers=headers).status_code for _ in range(2)]
    assert statuses == [202, 200]  # the replay's 200 is in the document, with its schema

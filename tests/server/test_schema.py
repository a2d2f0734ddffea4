"""The REST routes against their OpenAPI schema, driven by schemathesis on the service on
uvicorn with a token: generated requests with the token get no 5xx and answers that conform
to the schema; without it, 401 for every route but /healthz. The schema holds the request
bodies, and lists the routes docs/protocol.md lists."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gazecam.server.app import create_app
from gazecam.server.errors import OPENAI_PATHS
from gazecam.server.settings import ServerSettings
from tests.conftest import REPO
from tests.server.conftest import TOKEN, first_keyframe, uvicorn_server

BEARER = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Few examples a route: a loaded task card is costly, and each route's schema is small.
FUZZ = settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def served(make_app: Callable[..., FastAPI]) -> Iterator[str]:
    with uvicorn_server(make_app(token=TOKEN)) as address:
        # Before it, the crop and the asks are refused as not_ready (503), which schemathesis
        # takes for a server error.
        first_keyframe(address, TOKEN)
        yield f"http://{address}"


# The app's schema, read when the tests are collected (schemathesis' loading from a fixture
# fails on pytest 9: it sets a node attribute pytest no longer has). Building an app loads no
# model; test_the_served_schema_is_this_one checks that the service serves the same.
SCHEMA = create_app(ServerSettings(token=TOKEN)).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA)


@pytest.fixture(scope="module")
def openapi() -> Any:
    return schema


@schema.parametrize()
@FUZZ
def test_routes_with_the_token_conform_to_the_schema(case: Any, served: str) -> None:
    case.call_and_validate(base_url=served, headers=BEARER, checks=CHECKS)


@schema.parametrize()
@FUZZ
def test_routes_without_the_token_are_refused(case: Any, served: str) -> None:
    response = case.call(base_url=served)
    case.validate_response(response, checks=CHECKS)
    if case.method.upper() != case.operation.method.upper():
        # schemathesis tries methods the route does not take: refused before any data.
        assert response.status_code == 405 and response.headers["allow"], response.text
    elif case.path != "/healthz":
        assert response.status_code == 401, response.text
        body = response.json()
        # The OpenAI-compatible routes answer in OpenAI's error shape.
        error = body["error"] if case.path.startswith(OPENAI_PATHS) else body
        assert error["code"] == "unauthorized"


def test_the_schema_holds_the_request_bodies(openapi: Any) -> None:
    paths = openapi.raw_schema["paths"]
    task = paths["/v1/task"]["post"]["requestBody"]
    media = {"application/yaml", "text/plain", "multipart/form-data"}
    assert task["required"] and set(task["content"]) == media
    assert task["content"]["text/plain"]["schema"] == {"type": "string"}
    upload = task["content"]["multipart/form-data"]["schema"]
    assert upload["required"] == ["card"] and upload["additionalProperties"]["format"] == "binary"
    event = paths["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert event["properties"]["name"]["maxLength"] == 100
    assert event["required"] == ["name"] and event["additionalProperties"] is False
    error = openapi.raw_schema["components"]["schemas"]["ErrorFrame"]
    assert "method_not_allowed" in error["properties"]["code"]["enum"]
    chat = paths["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["model", "messages"] and body["additionalProperties"] is False
    assert "$ref" not in json.dumps(body)  # its nested models inlined: it stands alone
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    openai_error = {"$ref": "#/components/schemas/OpenAIError"}
    for status in ("400", "401", "404", "429", "503"):
        assert chat["responses"][status]["content"]["application/json"]["schema"] == openai_error


def test_the_schema_and_the_protocol_doc_list_the_same_routes(openapi: Any) -> None:
    doc = (REPO / "docs" / "protocol.md").read_text()
    # The HTTP table's rows: | `METHOD /path` | what |
    documented = set(re.findall(r"^\| `(GET|POST) (/\S*)` \|", doc, re.MULTILINE))
    in_schema = {
        (method.upper(), path)
        for path, operations in openapi.raw_schema["paths"].items()
        for method in operations
    }
    # The web client's page and the schema itself are in the doc, not in the schema.
    assert documented - in_schema == {("GET", "/"), ("GET", "/openapi.json")}
    assert in_schema <= documented


def test_the_served_schema_is_this_one(served: str) -> None:
    response = httpx.get(f"{served}/openapi.json", headers=BEARER)
    assert response.status_code == 200 and response.json() == SCHEMA
    assert httpx.get(f"{served}/openapi.json").status_code == 401

"""Schemathesis against the reference server: no 5xx, every answer documented and matching its schema.

The server serves no ``/openapi.json`` (it would be a route without authentication), so the schema is
built in-process from the same ``create_app`` the server runs, and every request goes to a real server on
127.0.0.1. CI runs a fixed, derandomized sample; ``HYPOTHESIS_PROFILE=soak`` (``make soak``) lets the
profile's example counts and fresh randomness apply instead.

What a schema cannot describe (a multipart part's own headers, a presigned URL's signed query) is
generated here with hypothesis, and the answers are still judged by schemathesis' checks.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from inprocess import openapi_of, routes_of
from schemathesis import Case
from schemathesis.specs.openapi.checks import ensure_resource_availability, response_schema_conformance

from syncd.server import RunningServer, ServerSettings, running_server

API_KEY = secrets.token_urlsafe(16)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SOAK = settings.get_current_profile_name() == "soak"
CI_EXAMPLES = 25
"""Generated cases per operation in CI, on top of schemathesis' own coverage and example cases."""
CI_RUN = settings(max_examples=CI_EXAMPLES, stateful_step_count=10, derandomize=True, deadline=None)
"""The hypothesis settings of this module's own properties in CI; under soak the profile's apply."""
SETTINGS = ServerSettings(data_dir=Path("unused"), api_key=API_KEY)
"""The fuzzed server's settings but for its data dir (the fixture's own)."""
SCHEMA = schemathesis.openapi.from_dict(openapi_of(SETTINGS))
SCHEMA.config.update(headers=AUTH)
SCHEMA.config.generation.update(max_examples=None if SOAK else CI_EXAMPLES, deterministic=not SOAK)
if not SOAK:
    SCHEMA.config.seed = 20260519


def ours(run: settings) -> settings:
    """``run`` in CI; the loaded profile (soak) otherwise."""
    return settings() if SOAK else run


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("fuzz-data")
    with running_server(ServerSettings(**{**vars(SETTINGS), "data_dir": data_dir, "port": 0})) as server:
        yield server


def origin(server: RunningServer) -> str:
    """The schema's paths start with ``/v1``; the base URL ends with it."""
    return server.base_url.removesuffix("/v1")


def conforms(
    server: RunningServer, method: str, path: str, *, key: bool = True, **parts: Any
) -> schemathesis.Response:
    """Send one hand-made request of a documented operation and run every schemathesis check on it;
    ``key=False`` sends no API key, as the SDK does on a presigned PUT."""
    case = SCHEMA[path][method].Case(**parts)
    return case.call_and_validate(base_url=origin(server), headers=AUTH if key else None, timeout=30)


@SCHEMA.parametrize()
def test_every_operation_conforms(case: Case[Any], fuzzed_server: RunningServer) -> None:
    case.call_and_validate(base_url=origin(fuzzed_server), timeout=30)


def test_method_not_allowed_lists_every_method_of_the_path(fuzzed_server: RunningServer) -> None:
    """``Allow`` on a 405 names all the path's methods (RFC 9110), though each method is its own route."""
    by_path: dict[str, set[str]] = {}
    for method, path in routes_of(SETTINGS):
        by_path.setdefault(path, set()).add(method)
    with httpx.Client(base_url=origin(fuzzed_server), headers=AUTH, timeout=30) as http:
        for path, methods in by_path.items():
            concrete = path.replace("{file_id}", "file-x").replace("{md5}", "0" * 32)
            for probe in ("OPTIONS", "PATCH"):
                answer = http.request(probe, concrete)
                assert answer.status_code == 405, (probe, path)
                assert set(answer.headers["allow"].split(", ")) == methods, (probe, path)


def empty(server: RunningServer) -> None:
    """Delete every listed file, so that each scenario starts from the same (empty) server."""
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
        while page := http.get("/files", params={"limit": 1000}).json():
            for item in page:
                assert http.delete(f"/files/{item['id']}").status_code == 200


def test_workflows_conform(fuzzed_server: RunningServer) -> None:
    """Chains linked by ids (upload → get → content → delete …), so reads see files that exist.

    Without ``ensure_resource_availability``: it takes ``/files/verify-upload/{id}`` for a resource of its
    own that a ``DELETE /files/{id}`` cannot remove, and reports the 404 after such a delete as a bug.
    """
    base = origin(fuzzed_server)

    class Workflow(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            empty(fuzzed_server)

        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"base_url": base, "timeout": 30}

        def validate_response(
            self,
            response: schemathesis.Response,
            case: Case[Any],
            additional_checks: list[schemathesis.CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            case.validate_response(
                response,
                additional_checks=additional_checks,
                excluded_checks=[ensure_resource_availability],
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    Workflow.run(settings=ours(CI_RUN))
    assert fuzzed_server.stats.contents > 0, "no workflow reached a stored file"


@ours(CI_RUN)
@given(skip=st.integers(min_value=0), limit=st.integers(min_value=1, max_value=1000))
@example(skip=2**63, limit=1)
def test_any_listing_offset_is_answered(fuzzed_server: RunningServer, skip: int, limit: int) -> None:
    """Offsets past SQLite's 64-bit INTEGER are valid to the schema's ``minimum: 0`` as well."""
    conforms(fuzzed_server, "GET", "/v1/files", query={"skip": skip, "limit": limit})


def served(server: RunningServer, path: str, **parts: Any) -> bytes:
    """A file's bytes from a content route, checked like :func:`conforms` except for deserialising the
    body: it is whatever was uploaded, typed however the client declared (``application/json`` or not)."""
    case = SCHEMA[path]["GET"].Case(**parts)
    response = case.call(base_url=origin(server), headers=AUTH, timeout=30)
    case.validate_response(response, excluded_checks=[response_schema_conformance])
    assert response.status_code == 200, response.text
    return response.content


PART_HEADER = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
"""A multipart part's header value: inside the body, so any byte but the line end reaches the server."""
FIELD_VALUE = st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), max_size=40).map(
    lambda s: s.strip().encode("latin-1")
)
"""An HTTP header value (RFC 9110 field-value): uvicorn answers anything else itself, before the app."""


@ours(CI_RUN)
@given(part_type=PART_HEADER, data=st.binary(max_size=64))
@example(part_type=b"a/b; charset=\x01", data=b"x")
@example(part_type=b"x", data=b"x")
def test_any_declared_part_type_is_served_back_validly(
    fuzzed_server: RunningServer, part_type: bytes, data: bytes
) -> None:
    """A part's ``Content-Type`` is the client's to choose; serving the file must still be valid HTTP."""
    boundary = "fuzz-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n'.encode()
        + b"Content-Type: "
        + part_type
        + b"\r\n\r\n"
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    with httpx.Client(base_url=fuzzed_server.base_url, headers=AUTH, timeout=30) as http:
        answer = http.post(
            "/files", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
    assert answer.status_code in (201, 400), answer.text
    if answer.status_code != 201:
        return
    item = answer.json()
    assert (
        served(fuzzed_server, "/v1/files/{file_id}/content", path_parameters={"file_id": item["id"]}) == data
    )
    token = httpx.URL(item["public_url"]).params["token"]
    public = served(
        fuzzed_server, "/v1/public/{file_id}", path_parameters={"file_id": item["id"]}, query={"token": token}
    )
    assert public == data


@ours(CI_RUN)
@given(filename=st.text(min_size=1, max_size=80), put_type=FIELD_VALUE, data=st.binary(max_size=64))
def test_any_presigned_put_is_answered_as_documented(
    fuzzed_server: RunningServer, filename: str, put_type: bytes, data: bytes
) -> None:
    """The signed PUT with whatever ``Content-Type`` and filename: stored, verified and served validly."""
    grant = conforms(
        fuzzed_server,
        "POST",
        "/v1/files/presigned-url",
        body={"filename": filename},
        media_type="application/json",
    )
    if grant.status_code != 200:
        return
    url = httpx.URL(grant.json()["url"])
    file_id = url.path.rsplit("/", 1)[-1]
    put = conforms(
        fuzzed_server,
        "PUT",
        "/v1/uploads/{file_id}",
        key=False,
        path_parameters={"file_id": file_id},
        query=dict(url.params),
        headers={"Content-Type": put_type.decode("latin-1")},
        body=data,
        media_type="application/octet-stream",
    )
    assert put.status_code == 200, put.text
    verified = conforms(
        fuzzed_server, "GET", "/v1/files/verify-upload/{file_id}", path_parameters={"file_id": file_id}
    )
    assert verified.json()["bytes"] == len(data)
    assert served(fuzzed_server, "/v1/files/{file_id}/content", path_parameters={"file_id": file_id}) == data

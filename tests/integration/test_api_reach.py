"""Reaching the API from a browser and from containers, as an attacker would try it too:
CORS only for the origins on the list (the preflight answered without the key, a foreign
origin told nothing), the Host allow-list against DNS rebinding, parameterised paths."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from swarm.api.cors import CorsPolicy
from swarm.api.files import load_or_create_secret
from swarm.api.server import LocalApi, Request, Response

pytestmark = [pytest.mark.processes, pytest.mark.timeout(30)]

ALLOWED = "http://localhost:3000"
PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


@dataclass
class Api:
    port: int
    secret: str

    def request(self, method: str, path: str, headers: dict[str, str], key: bool = True,
                host: str | None = None) -> tuple[int, dict[str, str], bytes]:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        sent = {"Host": host or f"127.0.0.1:{self.port}", **headers}
        if key:
            sent["Authorization"] = f"Bearer {self.secret}"
        try:
            conn.request(method, path, headers=sent)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


def cors_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("access-control-")}


@pytest.fixture
def api(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Api]:
    caplog.set_level(logging.DEBUG)
    secret = load_or_create_secret(tmp_path)
    started: queue.Queue = queue.Queue()

    async def item(req: Request) -> Response:
        return Response.json({"path": req.path})

    async def main() -> None:
        server = LocalApi(secret, cors=CorsPolicy.of([ALLOWED, "https://chat.example"]),
                          host_names=["host.docker.internal"])
        server.add_route("GET", "/v1/models", item)
        server.add_route("GET", "/v1/models/{model}", item)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(server.serve, 0)
                started.put((port, trio.lowlevel.current_trio_token(), scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    port, token, scope = started.get(timeout=5)
    yield Api(port, secret)
    trio.from_thread.run_sync(scope.cancel, trio_token=token)
    thread.join(timeout=5)
    assert secret not in caplog.text


def test_an_allowed_origins_preflight_is_answered_without_the_key(api: Api) -> None:
    status, headers, body = api.request("OPTIONS", "/v1/chat/completions",
                                        {"Origin": ALLOWED, **PREFLIGHT}, key=False)
    assert status == 204 and body == b""
    got = cors_headers(headers)
    assert got["access-control-allow-origin"] == ALLOWED
    assert "POST" in got["access-control-allow-methods"]
    assert "authorization" in got["access-control-allow-headers"]
    assert "x-stainless-os" in got["access-control-allow-headers"]
    assert headers["vary"] == "Origin"


def test_an_allowed_origin_may_read_replies_and_errors(api: Api) -> None:
    status, headers, _ = api.request("GET", "/v1/models", {"Origin": ALLOWED})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED
    assert "x-covey-max-tokens-lowered" in headers["access-control-expose-headers"]
    status, headers, _ = api.request("GET", "/v1/models", {"Origin": ALLOWED}, key=False)
    assert status == 401 and headers["access-control-allow-origin"] == ALLOWED
    status, headers, _ = api.request("GET", "/v1/models",
                                     {"Origin": "https://chat.example:443"})
    assert headers["access-control-allow-origin"] == "https://chat.example:443"


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:3001",
                                    "https://localhost:3000", "null",
                                    "http://localhost:3000.evil.example"])
def test_a_foreign_origin_gets_no_cors_header_and_learns_nothing(api: Api, origin: str
                                                                 ) -> None:
    status, headers, body = api.request("OPTIONS", "/v1/chat/completions",
                                        {"Origin": origin, **PREFLIGHT}, key=False)
    assert status == 403 and not cors_headers(headers)
    assert json.loads(body)["error"]["message"] == "Origin not allowed"
    status, headers, _ = api.request("GET", "/v1/models", {"Origin": origin})
    assert status == 200 and not cors_headers(headers)  # the browser keeps the page out


def test_a_rebound_host_gets_nothing_even_from_an_allowed_origin(api: Api) -> None:
    for method, headers in (("OPTIONS", {"Origin": ALLOWED, **PREFLIGHT}),
                            ("GET", {"Origin": ALLOWED})):
        status, got, _ = api.request(method, "/v1/models", headers,
                                     host=f"evil.example:{api.port}")
        assert status == 403 and not cors_headers(got)


def test_the_host_allow_list(api: Api) -> None:
    status, _, _ = api.request("GET", "/v1/models", {},
                               host=f"host.docker.internal:{api.port}")
    assert status == 200
    status, _, _ = api.request("GET", "/v1/models", {}, host=f"other.internal:{api.port}")
    assert status == 403


def test_a_parameterised_path_takes_the_rest_of_the_path(api: Api) -> None:
    status, _, body = api.request("GET", "/v1/models/org/some-model", {})
    assert status == 200 and json.loads(body)["path"] == "/v1/models/org/some-model"
    assert api.request("GET", "/v1/models", {})[0] == 200
    assert api.request("GET", "/v1/models/", {})[0] == 404
    assert api.request("POST", "/v1/models/x", {})[0] == 405

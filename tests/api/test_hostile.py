"""Hostile and careless clients: every bad input gets a 4xx in its dialect's shape, API
keys, size limits, schema-driven fuzzing, and a server that survives it all."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest

from embedsvc.api.errors import dialect_of
from tests.support import Server

BIG = "x " * 150_000  # 300k characters

# (what it is, TEI body, OpenAI body). Each must get a 4xx on both dialects.
BAD_INPUTS: list[tuple[str, Any, Any]] = [
    ("inputs is a number", {"inputs": 42}, {"input": 42}),
    ("inputs is a float list", {"inputs": [1.5, 2.5]}, {"input": [1.5]}),
    ("inputs is an object", {"inputs": {"a": 1}}, {"input": {"a": 1}}),
    ("inputs is a boolean", {"inputs": True}, {"input": False}),
    ("inputs is null", {"inputs": None}, {"input": None}),
    ("inputs missing", {"normalize": True}, {"model": "all-minilm-l6-v2"}),
    ("empty string", {"inputs": ""}, {"input": ""}),
    ("empty string in list", {"inputs": ["a", ""]}, {"input": ["a", ""]}),
    ("empty list", {"inputs": []}, {"input": []}),
    ("empty token list", {"inputs": [[]]}, {"input": [[]]}),
    ("nested three deep", {"inputs": [[["a"]]]}, {"input": [[[1]]]}),
    ("mixed strings and ids", {"inputs": ["a", 5]}, {"input": [5, "a"]}),
    ("null in list", {"inputs": ["a", None]}, {"input": [None]}),
    ("negative token id", {"inputs": [[101, -5, 102]]}, {"input": [101, -5]}),
    ("token id beyond vocab", {"inputs": [2**40]}, {"input": [[2**63]]}),
    ("dimensions as text", {"inputs": "a", "dimensions": "384"},
     {"input": "a", "dimensions": "384"}),
    ("dimensions zero", {"inputs": "a", "dimensions": 0}, {"input": "a", "dimensions": 0}),
    ("dimensions negative", {"inputs": "a", "dimensions": -64},
     {"input": "a", "dimensions": -64}),
    ("dimensions huge", {"inputs": "a", "dimensions": 10**12},
     {"input": "a", "dimensions": 10**12}),
    ("dimensions float", {"inputs": "a", "dimensions": 64.0},
     {"input": "a", "dimensions": 64.0}),
    ("normalize as text", {"inputs": "a", "normalize": "false"},
     {"input": "a", "truncate": "false"}),
    ("unknown encoding / direction", {"inputs": "a", "truncation_direction": "Middle"},
     {"input": "a", "encoding_format": "int4"}),
    ("unknown model", {"inputs": "a", "model": "gpt-9"}, {"input": "a", "model": "gpt-9"}),
    ("model as number", {"inputs": "a", "model": 7}, {"input": "a", "model": 7}),
    ("unknown prompt", {"inputs": "a", "prompt_name": "x"}, {"input": "a", "prompt_name": "x"}),
    ("lone surrogate in model", {"inputs": "a", "model": "\ud800"},
     {"input": "a", "model": "\udfff"}),
    ("enormous string", {"inputs": BIG}, {"input": BIG}),
    ("too long without truncation", {"inputs": "word " * 1000, "truncate": False},
     {"input": "word " * 1000, "truncate": False}),
    ("body is a list", ["a"], ["a"]),
    ("body is a string", "hello", "hello"),
]  # fmt: skip

RAW_BAD: list[tuple[str, bytes, dict[str, str]]] = [
    ("invalid JSON", b'{"inputs": "a",}', {"content-type": "application/json"}),
    ("truncated JSON", b'{"inputs": ["a"', {"content-type": "application/json"}),
    ("not JSON at all", b"inputs=hello", {"content-type": "application/x-www-form-urlencoded"}),
    ("binary body", bytes(range(256)), {"content-type": "application/octet-stream"}),
    ("empty body", b"", {"content-type": "application/json"}),
    ("lone surrogate", b'{"inputs": "a \\udc00 b", "input": "a \\udc00 b"}', {}),
    ("NaN dimension", b'{"inputs": "a", "input": "a", "dimensions": NaN}', {}),
    # 1,000 levels of lists: the decoder's recursion limit, a client's mistake (not a 5xx)
    (
        "nested 1000 deep",
        b'{"inputs": '
        + b"[" * 1000
        + b"1"
        + b"]" * 1000
        + b', "input": '
        + b"[" * 1000
        + b"1"
        + b"]" * 1000
        + b"}",
        {},
    ),
]


def assert_dialect_error(r: httpx.Response, openai: bool) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    if openai:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["message"]
    else:
        assert set(body) == {"error", "error_type"} and body["error"]


def post(c: httpx.Client, path: str, body: Any) -> httpx.Response:
    # json.dumps keeps lone surrogates as \\uXXXX escapes, as a careless client would send.
    return c.post(
        path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(("what", "tei", "oai"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_4xx_in_both_dialects(server: Server, what: str, tei: Any, oai: Any) -> None:
    with server.client() as c:
        assert_dialect_error(post(c, "/embed", tei), openai=False)
        assert_dialect_error(post(c, "/v1/embeddings", oai), openai=True)


@pytest.mark.parametrize(("what", "raw", "headers"), RAW_BAD, ids=[b[0] for b in RAW_BAD])
def test_bad_bodies_are_a_4xx(server: Server, what: str, raw: bytes, headers: dict) -> None:
    with server.client() as c:
        paths = [("/embed", False), ("/v1/embeddings", True)]
        if what != "NaN dimension":  # /tokenize takes no dimensions
            paths.append(("/tokenize", False))
        for path, openai in paths:
            assert_dialect_error(c.post(path, content=raw, headers=headers), openai)


def test_nul_characters_are_embedded(server: Server) -> None:
    with server.client() as c:
        r = c.post("/embed", json={"inputs": "nul \u0000 in the middle"})
        assert r.status_code == 200 and len(r.json()[0]) == 384


def test_limits(server_factory: Any) -> None:
    with (
        server_factory(max_payload_bytes=10_000, max_input_chars=500, max_request_tokens=100) as s,
        s.client() as c,
    ):
        r = c.post("/embed", json={"inputs": "a" * 20_000})
        assert r.status_code == 413 and "max_payload_bytes (10000)" in r.json()["error"]

        def chunks() -> Any:  # no content-length: the limit still applies
            yield b'{"inputs": "'
            for _ in range(30):
                yield b"b" * 1000
            yield b'"}'

        r = c.post("/v1/embeddings", content=chunks())
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = c.post("/embed", json={"inputs": ["ok", "c " * 300]})
        assert r.status_code == 422 and "inputs[1] has 600 characters" in r.json()["error"]
        r = c.post("/embed", json={"inputs": ["d e f g h " * 10] * 3})
        assert r.status_code == 413 and "more than max_request_tokens (100)" in r.json()["error"]
        r = c.post("/v2/embed", json={"texts": ["d e f g h " * 10] * 3})
        assert r.status_code == 413 and "more than max_request_tokens (100)" in r.json()["message"]
        r = c.post("/v2/embed", json={"texts": ["a" * 20_000]})
        assert r.status_code == 413 and "max_payload_bytes (10000)" in r.json()["message"]
        info = c.get("/info").json()
        assert (info["max_payload_bytes"], info["max_input_chars"]) == (10_000, 500)
        assert c.post("/embed", json={"inputs": "fine"}).status_code == 200


def test_api_keys(server_factory: Any, tmp_path: Any) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nfile-key-1\n")
    with server_factory(api_key="k-one,k-two", api_key_file=str(keyfile)) as s:
        with s.client() as c:
            r = c.post("/embed", json={"inputs": "a"})
            assert r.status_code == 401 and r.json() == {
                "error": "API key missing: send the header 'Authorization: Bearer <key>'",
                "error_type": "Unauthorized",
            }
            r = c.post(
                "/v1/embeddings", json={"input": "a"}, headers={"authorization": "Bearer no"}
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert "no" not in r.json()["error"]["message"].split(":")[0]
            for key in ("k-one", "k-two", "file-key-1"):
                r = c.post(
                    "/embed", json={"inputs": "a"}, headers={"authorization": f"Bearer {key}"}
                )
                assert r.status_code == 200
            assert c.get("/info").status_code == 401
            assert c.get("/v1/models").status_code == 401
            assert c.get("/health").status_code == 200  # open by default
            assert c.get("/metrics").status_code == 200
            for doc in ("/docs", "/redoc", "/openapi.json"):  # the API docs follow the key
                assert c.get(doc).status_code == 401
                assert c.get(doc, headers={"authorization": "Bearer k-one"}).status_code == 200
        # A client that waits for "100 Continue" before its body gets the 401 instead, and
        # never sends the body.
        host, port = s.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /embed HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"authorization: Bearer wrong\r\nexpect: 100-continue\r\n"
                b"content-length: 17\r\n\r\n"
            )
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 401 Unauthorized"), answer
            assert b"connection: close" in answer and b"100 Continue" not in answer
        import openai

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="k-two", max_retries=0)
        assert len(client.embeddings.create(model="all-minilm-l6-v2", input="x").data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="bad", max_retries=0).models.list()
    with server_factory(api_key="k", auth_health_metrics=True) as s, s.client() as c:
        assert c.get("/health").status_code == 401
        assert c.get("/health", headers={"authorization": "Bearer k"}).status_code == 200


@pytest.mark.parametrize("keys", [",", " , ,", " "])
def test_an_api_key_setting_without_a_key_stops_start_up(keys: str) -> None:
    """`--api-key ,` served with no key while /info said auth was on."""
    from embedsvc.errors import ConfigError
    from embedsvc.settings import Settings

    settings = Settings(api_key=keys)
    if keys.strip():
        with pytest.raises(ConfigError, match="holds no key"):
            settings.api_keys()
    else:  # blank: no keys asked for, none required
        assert settings.api_keys() == []


def test_cors_is_off_unless_configured(server_factory: Any) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    with server_factory() as s, s.client() as c:
        r = c.options("/embed", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
    with server_factory(cors_origins="https://app.example") as s, s.client() as c:
        r = c.options("/embed", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_with_an_api_key_works_for_browsers(server_factory: Any) -> None:
    """A browser's preflight carries no key: it is answered by CORS, not refused 401; the
    middleware's own refusals (401, 413) carry the CORS headers so the page can read them."""
    origin = "https://app.example"
    preflight = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    with (
        server_factory(cors_origins=origin, api_key="k", max_payload_bytes=1000) as s,
        s.client() as c,
    ):
        r = c.options("/v1/embeddings", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"origin": origin})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == origin
        r = c.post(
            "/embed",
            json={"inputs": "a" * 2000},
            headers={"origin": origin, "authorization": "Bearer k"},
        )
        assert r.status_code == 413 and r.headers["access-control-allow-origin"] == origin
        r = c.post(
            "/embed", json={"inputs": "a"}, headers={"origin": origin, "authorization": "Bearer k"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "x-request-id" in r.headers["access-control-expose-headers"]


def test_request_id_in_and_out(server: Server) -> None:
    with server.client() as c:
        r = c.post("/embed", json={"inputs": "a"}, headers={"x-request-id": "trace-123"})
        assert r.headers["x-request-id"] == "trace-123"
        r = c.post("/embed", json={"inputs": ""})
        assert len(r.headers["x-request-id"]) == 32


def test_openapi_fuzz_never_5xx(server: Server) -> None:
    """schemathesis generates requests from the service's own OpenAPI document; bounded
    in examples (and so in time), derandomized so a failure reproduces."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/embed", "/v1/embeddings", "/tokenize"}
    seen: list[int] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, timeout=30)
            seen.append(response.status_code)
            assert response.status_code < 500, (case.path, case.body, response.text[:300])
            if response.status_code >= 400:
                body = response.json()
                dialect = dialect_of(case.path)
                if dialect == "openai":
                    assert set(body["error"]) == {"message", "type", "param", "code"}
                elif dialect == "cohere":
                    assert set(body) == {"message"}
                else:
                    assert set(body) == {"error", "error_type"}

        check()
    assert len(seen) > 100
    with server.client() as c:
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200


def test_a_refused_large_body_still_gets_its_answer(server_factory: Any) -> None:
    """urllib writes the whole body before it reads: if the server answered and closed
    while it was writing, it saw a broken pipe instead of the 413 (or the 401)."""
    import urllib.error
    import urllib.request

    body = json.dumps({"inputs": "word " * 600_000}).encode()  # 3 MB
    assert len(body) > 2_000_000  # max_payload_bytes' default

    def post(url: str) -> int:
        req = urllib.request.Request(
            url + "/embed", data=body, headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    with server_factory() as s:
        assert [post(s.url) for _ in range(10)] == [413] * 10
    with server_factory(api_key="k") as s:
        assert [post(s.url) for _ in range(10)] == [401] * 10


def test_tokenize_is_bounded_like_embedding(server: Server) -> None:
    """/tokenize answered a 2 MB body with about a million token records: now the
    characters per text, the inputs per request and the tokens in all are checked as for
    /embed, the tokens before any record is made, and the server serves on."""
    with server.client() as c:
        r = c.post("/tokenize", json={"inputs": "a " * 100_001})
        assert r.status_code == 422 and "max_input_chars (200000)" in r.json()["error"]
        r = c.post("/tokenize", json={"inputs": ["a"] * 4097})
        assert r.status_code == 413 and "max_concurrent_inputs" in r.json()["error"]
        r = c.post("/tokenize", json={"inputs": ["a " * 99_999] * 9})
        assert r.status_code == 413, r.text
        assert "tokens in total, more than max_request_tokens (300000)" in r.json()["error"]
        ok = c.post("/tokenize", json={"inputs": ["a b"] * 3})
        assert ok.status_code == 200 and [t["text"] for t in ok.json()[0]][1:3] == ["a", "b"]


def test_similarity_is_bounded_like_embedding(server: Server) -> None:
    """/similarity embeds its sentences through the engine: the same bounds as /embed
    (characters and inputs before tokenizing, each input's tokens before queuing)."""
    with server.client() as c:
        body = {"inputs": {"source_sentence": "a", "sentences": ["b"] * 4096}}
        r = c.post("/similarity", json=body)  # 4097 texts with the source sentence
        assert r.status_code == 413 and "max_concurrent_inputs" in r.json()["error"]
        body = {"inputs": {"source_sentence": "a " * 100_001, "sentences": ["b"]}}
        r = c.post("/similarity", json=body)
        assert r.status_code == 422 and "max_input_chars (200000)" in r.json()["error"]
        long = {"source_sentence": "a", "sentences": ["a " * 99_999] * 9}
        body = {"inputs": long, "parameters": {"truncate": False}}
        r = c.post("/similarity", json=body)  # each one past the model's 256 tokens
        assert r.status_code == 422 and "more than" in r.json()["error"], r.text
        assert "256" in r.json()["error"]
        r = c.post("/similarity", json={"inputs": long})  # cut by default, and said so
        assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "9", r.text
        ok = c.post("/similarity", json={"inputs": {"source_sentence": "a", "sentences": ["a"]}})
        assert ok.status_code == 200 and abs(ok.json()[0] - 1.0) < 1e-5

"""Request traces over OTLP/HTTP: a collector stand-in in this process (an HTTP server that
decodes the protobuf export requests) receives one span per request, in the trace and
under the span of the caller's W3C traceparent, with its four steps as children and the
model, inputs and tokens as attributes; on both of the server's request paths."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from embedsvc.registry import Registry
from embedsvc.tracing import traces_url
from tests.support import run_server, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    """Spans posted to /v1/traces, decoded: (trace id, span id, parent id, name, attrs)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        spans, paths = self.spans, self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                paths.append(self.path)
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        for s in scope.spans:
                            attrs = {a.key: a.value for a in s.attributes}
                            spans.append(
                                {
                                    "trace": s.trace_id.hex(),
                                    "id": s.span_id.hex(),
                                    "parent": s.parent_span_id.hex(),
                                    "name": s.name,
                                    "start": s.start_time_unix_nano,
                                    "end": s.end_time_unix_nano,
                                    "attrs": attrs,
                                    "service": service.get("service.name"),
                                }
                            )
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms
    c = Collector()
    yield c
    c.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "stock"])
def test_a_requests_trace_reaches_the_collector(
    registry: Registry, collector: Collector, direct: bool
) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with run_server(
        registry, ["tiny-bge"], otlp_endpoint=collector.url, http_direct=direct
    ) as s, s.client() as c:  # fmt: skip
        r = c.post(
            "/embed", json={"inputs": ["a river", "the sea"]}, headers={"traceparent": traceparent}
        )
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        untraced = c.post("/v1/embeddings", json={"input": "a hill", "model": "tiny-bge"})
        assert untraced.status_code == 200
        wait_for(lambda: len(collector.spans) >= 10, timeout=20, what="two requests' spans")
    assert set(collector.paths) == {"/v1/traces"}
    ours = [x for x in collector.spans if x["trace"] == TRACE_ID]
    root = next(x for x in ours if x["parent"] == PARENT_ID)
    assert root["name"] == "POST /embed" and root["service"] == "embedsvc"
    attrs = root["attrs"]
    assert attrs["embedsvc.model"].string_value == "tiny-bge"
    assert attrs["embedsvc.inputs"].int_value == 2
    assert attrs["embedsvc.tokens"].int_value == int(r.headers["x-compute-tokens"])
    assert attrs["embedsvc.request_id"].string_value == rid
    children = {x["name"]: x for x in ours if x["parent"] == root["id"]}
    assert set(children) == {"tokenize", "queue", "inference", "serialize"}
    for child in children.values():
        assert root["start"] <= child["start"] <= child["end"] <= root["end"]
    # A request without a traceparent starts a trace of its own.
    other = [x for x in collector.spans if x["trace"] != TRACE_ID]
    assert {x["name"] for x in other} == {"POST /v1/embeddings", *children}


def test_tracing_is_off_by_default_and_the_url_gets_its_path(registry: Registry) -> None:
    with run_server(registry, ["tiny-bge"]) as s:
        assert s.app.state.service.tracer is None
        assert httpx.post(s.url + "/embed", json={"inputs": "x"}).status_code == 200
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://c.example/otlp/v1/traces") == "https://c.example/otlp/v1/traces"

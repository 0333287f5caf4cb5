"""What an engine route is: a body type, how a decoded body becomes an engine request, and
how the engine's result becomes the 200's body.

The dialect modules (tei.py, openai.py, rerank.py) each declare their engine routes as
`Route`s; routes.py answers every one of them the same way, from the HTTP protocol's
direct route, from the request middleware, or from the FastAPI app.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from embedsvc.api.service import Service
from embedsvc.engine import EmbedRequest, EmbedResult, ModelEngine


@dataclass(slots=True, frozen=True)
class Context:
    """What a route knows of the HTTP request besides its body."""

    path: str
    request_id: str
    timeout: float | None  # seconds (x-request-timeout), None: the server's limit


@dataclass(slots=True)
class Call:
    """A request on its way: the engine, what it asks of it, and how its result is
    answered. `metric`: the label embedsvc_requests counts it under (routes.py sets
    its Route's `label`); `trace`: the caller's traceparent, when tracing is on."""

    engine: ModelEngine
    req: EmbedRequest
    render: Callable[[EmbedResult], bytes]
    metric: str = ""
    trace: str = ""  # the request's W3C traceparent header, for its span (tracing.py)


@dataclass(frozen=True)
class Route:
    """An engine route, declared once: routes.py decodes its body, counts it in
    embedsvc_requests under `label` and answers it; app.py documents it in OpenAPI
    (tests/api/test_routes.py walks every one through all of these)."""

    path: str
    body: type[msgspec.Struct]
    call: Callable[[Service, Any, Context], Call]  # raises EmbedsvcError to refuse
    summary: str
    tag: str
    name: str = ""  # the OpenAPI operation name, where one function serves several paths
    metric: str = ""  # the route label of its metrics where not its path (an alias's)

    @property
    def label(self) -> str:
        return self.metric or self.path

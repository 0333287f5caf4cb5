"""Whether the installed uvicorn has what embedsvc's protocol overrides or calls (its
httptools protocol is not a public API), and the protocol uvicorn is to run."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http import flow_control
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from embedsvc.http.limits import ConnectionLimits
from embedsvc.http.protocol import STATUS_LINE, EmbedsvcHttpProtocol

log = logging.getLogger("embedsvc")

# The parts of uvicorn's httptools protocol (not a public API) that the classes below
# override or call, checked at start by `direct_route_problem`.
_METHODS = {
    "_start_asgi_task": ["self", "cycle", "app"],
    "_unset_keepalive_if_required": ["self"],
    "on_message_begin": ["self"],
    "on_url": ["self", "url"],
    "on_header": ["self", "name", "value"],
    "on_headers_complete": ["self"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "data_received": ["self", "data"],
    "send_400_response": ["self", "msg"],
    "resume_writing": ["self"],
    "pause_writing": ["self"],
    "_should_upgrade": ["self"],
    "handle_websocket_upgrade": ["self"],
    "_unsupported_upgrade_warning": ["self"],
}
_ATTRIBUTES = (
    "self.config",
    "self.loop",
    "self.parser",
    "self.flow",
    "self.pipeline",
    "self.cycle",
    "self.scope",
    "self.headers",
    "self.url",
    "self.expect_100_continue",
    "self.root_path",
    "self.server_state",
    "self.connections",
    "self.timeout_keep_alive_task",
    "self.timeout_keep_alive",
    "self.access_log",
    "self.access_logger",
    "self.client",
    "self.transport",
    "self.app",
    "self.logger",
)
_CYCLE_PARAMETERS = [
    "self", "scope", "transport", "flow", "logger", "access_logger", "access_log",
    "default_headers", "message_event", "expect_100_continue", "keep_alive", "on_response",
]  # fmt: skip


def direct_route_problem() -> str | None:
    """What of uvicorn's internals the direct route relies on is missing or has another
    shape in the installed uvicorn; None when all of it is there."""
    if not STATUS_LINE or not hasattr(flow_control, "HIGH_WATER_LIMIT"):
        return "uvicorn.protocols.http has no STATUS_LINE or HIGH_WATER_LIMIT"
    for name, parameters in _METHODS.items():
        method = getattr(HttpToolsProtocol, name, None)
        if method is None:
            return f"HttpToolsProtocol.{name} is missing"
        if list(inspect.signature(method).parameters) != parameters:
            return f"HttpToolsProtocol.{name} takes other arguments"
    source = inspect.getsource(HttpToolsProtocol)
    for attribute in _ATTRIBUTES:
        if attribute not in source:
            return f"HttpToolsProtocol has no {attribute[5:]}"
    on_header = inspect.getsource(HttpToolsProtocol.on_header)
    if "100-continue" not in on_header or "self.headers.append" not in on_header:
        return "HttpToolsProtocol.on_header does more than embedsvc's copy of it"
    if list(inspect.signature(RequestResponseCycle.__init__).parameters) != _CYCLE_PARAMETERS:
        return "RequestResponseCycle takes other arguments"
    return None


def http_protocol(direct: bool, limits: ConnectionLimits | None = None) -> Any:
    """uvicorn's `http` setting: embedsvc's protocol with these limits, its direct route on
    or off (`direct`), when the installed uvicorn has what it needs; else uvicorn's own
    httptools protocol with a WARNING: slower for small requests, the same answers, and of
    the limits only the connection cap holds there (as uvicorn's limit_concurrency)."""
    problem = direct_route_problem()
    if problem is not None:
        log.warning(
            "HTTP: uvicorn %s does not have what embedsvc's protocol needs (%s); serving "
            "with uvicorn's own protocol: slower for small requests, and of the connection "
            "bounds only --max-connections holds. The tested uvicorn releases are in "
            "requirements/dev.lock",
            uvicorn.__version__,
            problem,
        )
        return "httptools"
    if not direct:
        log.info("HTTP: every request through the ASGI app (--no-http-direct)")
    limits = limits or EmbedsvcHttpProtocol.limits
    if direct and limits == EmbedsvcHttpProtocol.limits:
        return EmbedsvcHttpProtocol
    attributes = {"limits": limits, "direct_route": direct}
    return type("EmbedsvcHttpProtocol", (EmbedsvcHttpProtocol,), attributes)

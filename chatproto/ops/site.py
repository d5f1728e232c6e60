"""The operations listener (``[metrics] listen``): ``/metrics``, ``/health``, ``/ready``.

A ``twisted.web`` site of its own, apart from the chat listeners, so that it can stay
on the loopback interface (or a management network) while the realm serves the world:

- ``/metrics``: Prometheus' text format, rendered by ``prometheus_client``'s Twisted
  resource (its WSGI application in a ``WSGIResource``, in the reactor's thread pool)
  after :meth:`chatproto.ops.metrics.RealmMetrics.refresh` has taken the realm's
  figures on the reactor thread;
- ``/health``: ``200 ok`` while the process runs and its reactor turns (liveness);
- ``/ready``: ``200`` when the realm can serve -- its store answers, every listener is
  listening and it is not draining -- else ``503``; the body says which check failed
  (readiness, for load balancers and ``systemd`` units).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.exposition import make_wsgi_app
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.wsgi import WSGIResource

__all__ = ["OpsSite"]


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, ops: Any, reactor: Any) -> None:
        super().__init__()
        self._ops = ops
        # What prometheus_client.twisted.MetricsResource is, on our registry and with
        # the realm's reactor rather than the global one.
        self._wsgi = WSGIResource(
            reactor, reactor.getThreadPool(), make_wsgi_app(ops.metrics.registry)
        )

    def render_GET(self, request: Any) -> Any:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def render(_: object) -> None:
            if not gone:
                self._wsgi.render(request)

        self._ops.metrics.refresh().addBoth(render)
        return NOT_DONE_YET


class _Health(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return b"ok\n"


class _Ready(Resource):
    isLeaf = True

    def __init__(self, ops: Any) -> None:
        super().__init__()
        self._ops = ops

    def render_GET(self, request: Any) -> Any:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(report: dict[str, Any]) -> None:
            if gone:
                return
            request.setResponseCode(200 if report["ready"] else 503)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.write(json.dumps(report, sort_keys=True).encode() + b"\n")
            request.finish()

        self._ops.readiness().addCallback(answer)
        return NOT_DONE_YET


class _Index(Resource):
    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"chatrealm operations: /metrics /health /ready\n"

    def getChild(self, path: bytes, request: Any) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)


class OpsSite(Site):
    """The site of the operations listener of one realm process (see the module
    docstring); ``ops`` is its :class:`chatproto.ops.service.Operations`."""

    def __init__(self, ops: Any, reactor: Any) -> None:
        self.ops = ops
        self.realm = ops.realm  # named in the listener's log line
        root = _Index()
        if ops.metrics is not None:
            root.putChild(b"metrics", _Metrics(ops, reactor))
        root.putChild(b"health", _Health())
        root.putChild(b"ready", _Ready(ops))
        super().__init__(root)
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: Any) -> None:
        """Scrapes and probes every few seconds are not worth a log line each."""

"""Operating a realm: what an operator sees and does while the realm runs.

- :mod:`chatproto.ops.stats` -- the plain counters the realm and its protocols bump
  (always there, nearly free: no locks, no label look-ups on the hot paths);
- :mod:`chatproto.ops.metrics` -- the Prometheus view of them, plus the histograms of
  the store's group commits and the event loop's lag (``prometheus_client``);
- :mod:`chatproto.ops.site` -- the operations listener (``[metrics] listen``):
  ``/metrics``, ``/health`` and ``/ready``;
- :mod:`chatproto.ops.service` -- :class:`chatproto.ops.service.Operations`, which
  wires them into a realm process, knows whether it is ready or draining, reloads TLS
  certificates and drains;
- :mod:`chatproto.ops.commands`, :mod:`chatproto.ops.control` and
  :mod:`chatproto.ops.controlclient` -- the control channel: AMP on a UNIX socket
  between ``chatrealmctl`` and the running realm.

None of this decides anything about chat: it reads the realm's state and calls the
realm's own methods (see docs/operator-guide.md, "Metrics and health").
"""

"""Reading `rwkv serve`'s Prometheus counters, for the scripts that measure the server."""

import http.client


def metric(host, port, name):
    """The value of counter `name` at `GET /metrics` (0 when the server has not counted it)."""
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0

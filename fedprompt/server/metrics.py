"""Prometheus metrics of a running `fedprompt server` (`server.metrics_address`): the only
prometheus_client importer. Figures come from the metrics rows as the round loop writes them,
so what Prometheus scrapes is what metrics.jsonl says.

Scrape http://<server.metrics_address>/metrics. Names (all prefixed fedprompt_):
rounds_completed, rounds_planned, clients_connected, clients_sampled, clients_aggregated (last
round), replies_rejected_total{reason} (error, payload, metrics, no_reply, screened),
bytes_up_total, bytes_down_total, round_duration_seconds (last round), accuracy (last round's
reported accuracy), epsilon (the largest spent, when privacy is on).
"""

from __future__ import annotations

from fedprompt import processes
from fedprompt.rundir import RunError


class Exporter:
    """An HTTP endpoint on `address` (host:port) serving the run's figures."""

    def __init__(self, address: str, rounds: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        host, port = processes.split_address(address, "server.metrics_address")
        if processes.port_in_use(host, port):
            raise RunError(f"server.metrics_address {address}: port {port} is already in use; pick another with --set server.metrics_address={host}:PORT")
        r = self.registry = CollectorRegistry()
        self.g = {
            name: Gauge(f"fedprompt_{name}", doc, registry=r)
            for name, doc in [
                ("rounds_completed", "federated rounds completed"),
                ("rounds_planned", "federation.rounds"),
                ("clients_connected", "clients connected at the end of the last round"),
                ("clients_sampled", "clients sampled to train in the last round"),
                ("clients_aggregated", "updates aggregated in the last round"),
                ("round_duration_seconds", "the last round's wall time, evaluation included"),
                ("accuracy", "the last round's reported accuracy"),
                ("epsilon", "the largest epsilon spent so far (privacy on)"),
            ]
        }
        self.rejected = Counter("fedprompt_replies_rejected", "sampled clients' updates not aggregated, by reason", ["reason"], registry=r)
        self.up = Counter("fedprompt_bytes_up", "bytes of updates received", registry=r)
        self.down = Counter("fedprompt_bytes_down", "bytes of global payloads sent", registry=r)
        self.g["rounds_planned"].set(rounds)
        self.server, self.thread = start_http_server(port, addr=host, registry=r)

    def row(self, row: dict) -> None:
        """Take one metrics row (round 0 included)."""
        g = self.g
        g["rounds_completed"].set(row["round"])
        if row["round"] == 0:
            return
        g["clients_sampled"].set(row["clients"] + row["failures"])
        g["clients_aggregated"].set(row["clients"])
        if "connected" in row:
            g["clients_connected"].set(row["connected"])
        for reason, n in (row.get("rejected") or {}).items():
            self.rejected.labels(reason=reason).inc(n)
        self.up.inc(row.get("bytes_up_total") or 0)
        self.down.inc(row.get("bytes_down_total") or 0)
        g["round_duration_seconds"].set(row["round_s"])
        if row.get("accuracy") is not None:
            g["accuracy"].set(row["accuracy"])
        if row.get("epsilon") is not None:
            g["epsilon"].set(row["epsilon"])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

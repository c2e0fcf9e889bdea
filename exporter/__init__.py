"""zenmux-exporter: resolves ZenMux generation ids into Prometheus metrics, spans and a durable ledger."""

__version__ = "0.1.0"

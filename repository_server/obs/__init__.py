"""Observability: Prometheus metrics, health and readiness, structured logs."""

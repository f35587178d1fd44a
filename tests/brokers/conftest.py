"""Clusterable brokers (RabbitMQ's MQTT plugin, NATS's MQTT support), each started once per test session."""

from __future__ import annotations

import pytest

from tests.fleet.conftest import pg_dsn
from tests.support.brokers import DEPLOY_TIMES, STARTED, ExternalBroker, nats_broker, rabbitmq_broker

__all__ = ["nats_broker", "rabbitmq_broker", "clusterable", "pg_dsn"]


@pytest.fixture(params=["rabbitmq", "nats"])
def clusterable(request: pytest.FixtureRequest) -> ExternalBroker:
    broker: ExternalBroker = request.getfixturevalue(f"{request.param}_broker")
    return broker


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for kind, version, seconds in STARTED:
        terminalreporter.write_line(f"broker {kind} {version}: accepting MQTT {seconds:.2f} s after start")
    for kind, size, chunks, seconds in DEPLOY_TIMES:
        terminalreporter.write_line(f"deploy through {kind}: {size} bytes in {chunks} chunks, first chunk "
                                    f"published -> verified answer {seconds:.2f} s")

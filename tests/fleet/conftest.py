"""Real-broker fixtures for the fleet view tests (shared helper in tests/support/broker.py)."""

from __future__ import annotations

from tests.support.broker import broker_factory, mosquitto, pki, recorder_factory

__all__ = ["broker_factory", "mosquitto", "pki", "recorder_factory"]

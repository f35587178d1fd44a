"""Model rollouts to a fleet (operator side): bundle chunks on MQTT, waves of signed ``deploy`` commands,
probation followed through heartbeats and events, automatic halt and rollback, state that survives the
operator's process (docs/fleet.md, "Rolling out a model")."""

from __future__ import annotations

from ._engine import RolloutEngine, Transport, abort_marker
from ._mqtt import MqttTransport
from ._observe import AnswerSeen, DeployStateSeen, Observation, parse_unverified_message
from ._plan import ROLLOUT_ID, Rollout, Settings, Wave, list_rollouts, parse_waves, plan_waves, rollout_path

__all__ = [
    "RolloutEngine",
    "Transport",
    "abort_marker",
    "MqttTransport",
    "AnswerSeen",
    "DeployStateSeen",
    "Observation",
    "parse_unverified_message",
    "ROLLOUT_ID",
    "Rollout",
    "Settings",
    "Wave",
    "list_rollouts",
    "parse_waves",
    "plan_waves",
    "rollout_path",
]

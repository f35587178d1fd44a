"""The service: ``edgeguard run`` = a supervisor running the worker (sources -> engine -> outbox -> link).

See docs/service.md for the configuration (every key), the supervisor's restart policy and the safe state.
"""

from __future__ import annotations

from ._hooks import EVENT_KINDS, HookRunner
from ._pipeline import Pipeline
from ._run import build_chain, run_service
from ._session import ServiceSession
from ._state import SupervisorState, read_state, write_state
from ._supervisor import Supervisor
from .config import ServiceConfig, load_config, parse_config

__all__ = [
    "EVENT_KINDS",
    "HookRunner",
    "Pipeline",
    "ServiceConfig",
    "ServiceSession",
    "Supervisor",
    "SupervisorState",
    "build_chain",
    "load_config",
    "parse_config",
    "read_state",
    "run_service",
    "write_state",
]

"""The service: ``edgeguard run`` = a supervisor running the worker (sources -> engine -> outbox -> link).

See docs/service.md for the configuration (every key), the supervisor's restart policy and the safe state.

The names below are imported on first use (PEP 562): the supervisor process imports modules of this package
(``_supervisor_main``, ``_supervisor``) and must not pull in the worker's stack (numpy, onnxruntime, aiohttp,
paho) through this ``__init__``; ``from edgeguard.service import X`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeguard._lazy import lazy_exports

if TYPE_CHECKING:
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

_HOME = {
    "EVENT_KINDS": "._hooks",
    "HookRunner": "._hooks",
    "Pipeline": "._pipeline",
    "build_chain": "._run",
    "run_service": "._run",
    "ServiceSession": "._session",
    "SupervisorState": "._state",
    "read_state": "._state",
    "write_state": "._state",
    "Supervisor": "._supervisor",
    "ServiceConfig": ".config",
    "load_config": ".config",
    "parse_config": ".config",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _HOME)

"""Input sources, each a trust boundary parsed in one place with hard size limits.

Every source turns untrusted bytes into an :class:`InferenceRequest` and hands it to an :class:`InferenceSink`
(the service's engine + outbox pipeline); the engine's input guard checks the tensors after that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeguard._lazy import lazy_exports

if TYPE_CHECKING:
    from ._abuse import AbuseConfig
    from ._api import AdminHandler, ApiConfig, ApiSource
    from ._budget import BudgetConfig, BudgetLimits, QueryBudgets
    from ._directory import DirectoryConfig, DirectorySource
    from ._mqtt import MqttInputSource
    from ._openapi import OPENAPI
    from ._request import (
        BodyLimits,
        InferenceRequest,
        InferenceSink,
        SourceName,
        UnsupportedMediaType,
        parse_body,
    )
    from ._serial import SerialConfig, SerialSource, parse_sensor_frame
    from ._tokens import SCOPES, Scope, Token, TokenStore, credential_path

__all__ = [
    "AbuseConfig",
    "AdminHandler",
    "ApiConfig",
    "ApiSource",
    "BodyLimits",
    "BudgetConfig",
    "BudgetLimits",
    "DirectoryConfig",
    "DirectorySource",
    "InferenceRequest",
    "InferenceSink",
    "MqttInputSource",
    "OPENAPI",
    "QueryBudgets",
    "SCOPES",
    "Scope",
    "SerialConfig",
    "SerialSource",
    "SourceName",
    "Token",
    "TokenStore",
    "UnsupportedMediaType",
    "credential_path",
    "parse_body",
    "parse_sensor_frame",
]

# Imported on first use (PEP 562): a process that needs one source, or only the framing helpers (the MCU
# watchdog in the supervisor), does not load every source's stack (aiohttp, numpy).
_HOME = {
    "AbuseConfig": "._abuse",
    "AdminHandler": "._api",
    "ApiConfig": "._api",
    "ApiSource": "._api",
    "BudgetConfig": "._budget",
    "BudgetLimits": "._budget",
    "QueryBudgets": "._budget",
    "DirectoryConfig": "._directory",
    "DirectorySource": "._directory",
    "MqttInputSource": "._mqtt",
    "OPENAPI": "._openapi",
    "BodyLimits": "._request",
    "InferenceRequest": "._request",
    "InferenceSink": "._request",
    "SourceName": "._request",
    "UnsupportedMediaType": "._request",
    "parse_body": "._request",
    "SerialConfig": "._serial",
    "SerialSource": "._serial",
    "parse_sensor_frame": "._serial",
    "SCOPES": "._tokens",
    "Scope": "._tokens",
    "Token": "._tokens",
    "TokenStore": "._tokens",
    "credential_path": "._tokens",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _HOME)

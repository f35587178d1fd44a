"""Input sources, each a trust boundary parsed in one place with hard size limits.

Every source turns untrusted bytes into an :class:`InferenceRequest` and hands it to an :class:`InferenceSink`
(the service's engine + outbox pipeline); the engine's input guard checks the tensors after that.
"""

from __future__ import annotations

from ._abuse import AbuseConfig
from ._api import AdminHandler, ApiConfig, ApiSource
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
    "DirectoryConfig",
    "DirectorySource",
    "InferenceRequest",
    "InferenceSink",
    "MqttInputSource",
    "OPENAPI",
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

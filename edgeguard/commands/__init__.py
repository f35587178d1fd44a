"""Signed remote commands, device side (docs/commands.md): the gatekeeper, the nonce store and the service
that answers on ``cmd/resp``. The wire format is shared with the operator tool (``edgeguard.fleet.commands``).
"""

from __future__ import annotations

from ._device import NOT_YET, Action, CommandService
from ._format import ANSWER_LABEL, COMMAND_LABEL, FORMAT_VERSION, canonical, envelope, new_nonce
from ._nonces import DEFAULT_CAPACITY, NONCE_FILE, NonceStore
from ._verify import MAX_VALIDITY_S, Command, CommandGate, parse_unverified_nonce

__all__ = [
    "ANSWER_LABEL",
    "COMMAND_LABEL",
    "DEFAULT_CAPACITY",
    "FORMAT_VERSION",
    "MAX_VALIDITY_S",
    "NONCE_FILE",
    "NOT_YET",
    "Action",
    "Command",
    "CommandGate",
    "CommandService",
    "NonceStore",
    "canonical",
    "envelope",
    "new_nonce",
    "parse_unverified_nonce",
]

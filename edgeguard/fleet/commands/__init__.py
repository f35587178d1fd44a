"""``edgeguard fleet send``: sign remote commands with an operator key, publish them to devices and verify
their signed answers (docs/commands.md). Operator side only."""

from __future__ import annotations

from ._send import CommandSender, Delivery, SendReport
from ._sign import Answer, SignedCommand, Verdict, check_answer, learned_key, parse_target, sign_command

__all__ = [
    "Answer",
    "CommandSender",
    "Delivery",
    "SendReport",
    "SignedCommand",
    "Verdict",
    "check_answer",
    "learned_key",
    "parse_target",
    "sign_command",
]

"""The one template of a fleet device's ``edgeguard.toml``.

Installed at ``/etc/edgeguard/edgeguard.toml`` by ``edgeguard provision``; every path in it is relative to
that file (``../../var/lib/edgeguard`` is ``/var/lib/edgeguard``), so the same bytes work on a board and under
``provision --root`` in a test. The device key and the API tokens are systemd credentials (the shipped unit's
``LoadCredential=`` lines read ``/etc/edgeguard/device.key`` and ``/etc/edgeguard/api-tokens``).

``device.groups``, ``device.signing_key`` and the ``[commands]`` table belong to the signed-commands work;
a runtime whose config does not know them refuses them as unknown keys, so they are written only when this
runtime's config dataclasses have them (checked at run time, like ``edgeguard init`` does for
``model.name``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

__all__ = ["DEVICE_CONFIG_TEMPLATE", "render_device_config", "optional_keys"]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

DEVICE_CONFIG_TEMPLATE = """\
# Device {device_id} of fleet {fleet}, made by `edgeguard fleet` (docs/fleet.md; every key: docs/service.md).
# Installed at /etc/edgeguard/edgeguard.toml by `edgeguard provision`; paths are relative to this file.
[device]
id = "{device_id}"
fleet = "{fleet}"
state_dir = "../../var/lib/edgeguard"        # /var/lib/edgeguard (systemd StateDirectory=edgeguard)
{device_extra}
[model]
bundle = "../../var/lib/edgeguard/model.egm"  # bundles sealed by `edgeguard fleet seal`
trust = ["publisher.pub"]                    # the fleet's publisher key
device_key_credential = "device-key"         # LoadCredential=device-key:/etc/edgeguard/device.key

[sources.api]
host = "127.0.0.1"
port = {api_port}
tokens_credential = "api-tokens"             # LoadCredential=api-tokens:/etc/edgeguard/api-tokens

[link]                                       # mutual TLS to the fleet broker (fleet broker-config)
host = "{broker_host}"
port = {broker_port}
ca_file = "fleet-ca.pem"
client_cert = "client.pem"                   # CN = {device_id}: the broker's user name for this device
client_key = "client.key"
{commands_table}{site_table}"""

# A device in a group gets site.pem (CN site:<device>) for its site connection: the fleet's broker makes the
# CN the client id, so the link's certificate would make the two connections take each other's session.
_SITE_TABLE = """
[site]                                       # site group (docs/sites.md): enabled = true joins it
enabled = false
group = "{group}"                            # one of device.groups
client_cert = "site.pem"                     # CN = site:{device_id}: the site connection's own identity
client_key = "client.key"                    # the same key as the link's certificate
"""

_COMMANDS_TABLE = """
[commands]                                   # signed commands: edgeguard/v1/{fleet}/{device_id}/cmd
enabled = true
operator_keys = ["operator.pub"]             # the fleet's operator command-signing key
"""


def optional_keys() -> tuple[bool, bool, bool]:
    """(device.groups, device.signing_key, [commands]) known to this runtime's config."""
    from edgeguard.service import config  # noqa: PLC0415 - the service config only when rendering

    device_fields = {f.name for f in dataclasses.fields(config.DeviceSection)}
    service_fields = {f.name for f in dataclasses.fields(config.ServiceConfig)}
    return "groups" in device_fields, "signing_key" in device_fields, "commands" in service_fields


def render_device_config(
    *,
    device_id: str,
    fleet: str,
    groups: tuple[str, ...],
    broker_host: str,
    broker_port: int,
    api_port: int,
    site: bool = False,
) -> str:
    """``site``: the device has ``site.pem`` (it is in a group): a ``[site]`` table for its first group."""
    has_groups, has_signing_key, has_commands = optional_keys()
    extra = ""
    if has_groups:
        extra += "groups = [" + ", ".join(f'"{g}"' for g in groups) + "]\n"
    if has_signing_key:
        extra += 'signing_key = "device-sign.key"            # signs command answers (Ed25519)\n'
    text = DEVICE_CONFIG_TEMPLATE.format(
        device_id=device_id,
        fleet=fleet,
        device_extra=extra,
        api_port=api_port,
        broker_host=broker_host,
        broker_port=broker_port,
        commands_table=_COMMANDS_TABLE.format(fleet=fleet, device_id=device_id) if has_commands else "",
        site_table=_SITE_TABLE.format(group=groups[0], device_id=device_id) if site and groups else "",
    )
    # The runtime's own parser judges the result: a template bug (or a key this runtime refuses) fails here,
    # at the operator, not on a hundred boards.
    from edgeguard.service.config import parse_config  # noqa: PLC0415

    parse_config(tomllib.loads(text), path=Path("/etc/edgeguard/edgeguard.toml"))
    return text

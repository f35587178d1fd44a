"""Fleet provisioning (operator side): the fleet directory and CA, device and operator identities, per-device
provisioning archives, the broker's TLS/ACL/CRL configuration, revocation, and sealing for the fleet.

docs/fleet.md walks through it from an empty directory to connected devices. The device side (``edgeguard
enroll`` / ``edgeguard provision``) is ``edgeguard.provisioning``; this package is never imported by the
device runtime.
"""

from ._broker import MAX_PACKET_SIZE, BrokerFiles, write_broker_config
from ._csv import read_devices_csv
from ._fleetdir import BrokerAddress, FleetConfig, FleetDir, parse_broker
from ._init import FleetIds, init_fleet
from ._inventory import DeviceRecord, Inventory, OperatorRecord
from ._issue import Issuer
from ._pki import OPERATOR_CN_PREFIX
from ._seal import seal_for_fleet
from ._template import DEVICE_CONFIG_TEMPLATE, render_device_config

__all__ = [
    "MAX_PACKET_SIZE",
    "BrokerFiles",
    "write_broker_config",
    "BrokerAddress",
    "FleetConfig",
    "FleetDir",
    "parse_broker",
    "DeviceRecord",
    "Inventory",
    "OperatorRecord",
    "FleetIds",
    "Issuer",
    "init_fleet",
    "read_devices_csv",
    "OPERATOR_CN_PREFIX",
    "seal_for_fleet",
    "DEVICE_CONFIG_TEMPLATE",
    "render_device_config",
]

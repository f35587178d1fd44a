"""Device-side provisioning: enrolment (keys and CSR made on the device), installing an archive.

The archive format and its gatekeeper live here too, since the device is the party that must verify one; the
operator side (``edgeguard.fleet.provision``) writes archives with :func:`build_archive` from this package
(never the other way round: the device runtime does not import ``edgeguard.fleet``).
"""

from ._archive import (
    ARCHIVE_FORMAT,
    MAX_ARCHIVE_BYTES,
    PRIVATE_FILES,
    PUBLIC_FILES,
    OpenedArchive,
    build_archive,
    open_archive,
    read_archive_file,
)
from ._enroll import DEVICE_KEY_URN, SIGN_KEY_URN, Enrolment, enroll, load_private_pem, new_private_file
from ._install import REQUIRED_FILES, SERVICE_USER, InstallReport, install_archive

__all__ = [
    "ARCHIVE_FORMAT",
    "MAX_ARCHIVE_BYTES",
    "PRIVATE_FILES",
    "PUBLIC_FILES",
    "OpenedArchive",
    "build_archive",
    "open_archive",
    "read_archive_file",
    "DEVICE_KEY_URN",
    "SIGN_KEY_URN",
    "Enrolment",
    "enroll",
    "load_private_pem",
    "new_private_file",
    "REQUIRED_FILES",
    "SERVICE_USER",
    "InstallReport",
    "install_archive",
]

"""``edgeguard keygen | pack | verify | inspect``: keys and sealed model bundles from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Any

from edgeguard._atomic import atomic_write
from edgeguard._hardening import harden_process
from edgeguard.bundle import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SUITE,
    SUITE_CHOICES,
    TrustStore,
    inspect_bundle,
    load_golden_npz,
    load_meta,
    open_bundle,
    pack_bundle,
    read_model,
    verify_bundle,
)
from edgeguard.bundle.manifest import ModelFormat
from edgeguard.errors import ConfigError
from edgeguard.keys import generate_keypair, load_device_key, load_publisher_key, load_recipient_key

_RAW = argparse.RawDescriptionHelpFormatter

_KEYGEN_HELP = """\
Create a key pair. A publisher key signs bundles (Ed25519); a device key receives them (X25519); an
operator key signs remote commands (Ed25519, docs/commands.md).
Writes DIR/<kind>.key (mode 0600, never overwritten) and DIR/<kind>.pub, both PEM, and prints the key id
(first 16 hex digits of SHA-256 over the raw public key).

example:
  edgeguard keygen publisher --out keys/     # keep publisher.key offline; ship publisher.pub to devices
  edgeguard keygen device --out /etc/edgeguard   # on the device; send device.pub to the publisher"""

_PACK_HELP = """\
Seal a model (.onnx or .tflite) for one or more devices: a fresh content key encrypts the model, each
recipient gets that key wrapped for its device.pub, and the publisher key signs everything.
Inputs/outputs are read from the model unless --meta gives them; golden vectors whose .npz holds only
inputs ("<i>/in/<name>") get their outputs ("<i>/out/<name>") from a CPU reference run.

example:
  edgeguard pack yolov8n.onnx --name yolo --version 3 --sign-key keys/publisher.key \\
      --recipient dev1/device.pub --recipient dev2/device.pub --golden golden.npz \\
      --expires 2027-06-30T00:00:00Z -o yolo-v3.egm
  # output hardening, signed with the bundle: at most 3 classes, scores to 2 decimals, no raw tensors,
  # Laplace noise of scale 0.01 on every score
  edgeguard pack cls.onnx --name cls --version 1 --sign-key keys/publisher.key --recipient dev1/device.pub \
      --meta cls.json --top-k 3 --round-decimals 2 --no-raw-logits --noise laplace:0.01 -o cls-v1.egm"""

_VERIFY_HELP = """\
Check a bundle as a device would: signer trusted and not revoked, signature, expiry, rollback floor
(with --state), signed digest of every byte. With --device-key it also unwraps the content key, decrypts in
memory and checks the model's SHA-256. Nothing is written unless --commit is given.
Exit 0 when the bundle is accepted, 3 when it is rejected (stderr names the failed check).

example:
  edgeguard verify yolo-v3.egm --trust keys/publisher.pub --device-key /etc/edgeguard/device.key \\
      --state /var/lib/edgeguard"""

_INSPECT_HELP = """\
Print a bundle's manifest as JSON (no keys needed, nothing secret is in it). The signature is NOT checked:
use `edgeguard verify` before trusting what this prints."""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's subcommands to ``sub``; each sets ``handler`` returning an exit code."""
    p = sub.add_parser(
        "keygen",
        help="create a publisher, device or operator key pair",
        description=_KEYGEN_HELP,
        formatter_class=_RAW,
    )
    p.add_argument("kind", choices=("publisher", "device", "operator"))
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory for the key files")
    p.set_defaults(handler=_keygen)

    p = sub.add_parser(
        "pack",
        help="seal a model into a signed, encrypted bundle (.egm)",
        description=_PACK_HELP,
        formatter_class=_RAW,
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="model file (.onnx or .tflite)")
    p.add_argument("--name", required=True, help="model name (letters, digits, . _ -; rollback is per name)")
    p.add_argument("--version", required=True, type=int, help="integer version, must grow with each release")
    p.add_argument("--sign-key", required=True, type=Path, metavar="KEY", help="publisher.key")
    p.add_argument(
        "--recipient",
        required=True,
        action="append",
        type=Path,
        metavar="PUB",
        help="a device.pub (repeat for several devices, or give a fleet key)",
    )
    golden = p.add_mutually_exclusive_group()
    golden.add_argument(
        "--golden",
        type=Path,
        metavar="FILE.npz",
        help="golden vectors: '<i>/in/<name>' [+ out] (default: none)",
    )
    golden.add_argument(
        "--golden-from",
        type=Path,
        metavar="DIR",
        help="golden vectors from the PNG/JPEG images in DIR (at most 16), preprocessed as --meta declares; "
        "outputs from a CPU reference run (default: none)",
    )
    p.add_argument(
        "--expires",
        metavar="ISO8601",
        help="devices refuse the bundle after this time: 2027-06-30T12:00:00Z, 2027-06-30T14:00+02:00, or a "
        "date alone, 2027-06-30, meaning 00:00 UTC that day (default: never expires)",
    )
    p.add_argument(
        "--force", action="store_true", help="pack even when --expires is already in the past (tests only)"
    )
    p.add_argument(
        "--meta",
        type=Path,
        metavar="FILE.json",
        help="inputs/outputs/preprocess/postprocess/input_stats/quantization/tolerance/description",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"plaintext bytes per AEAD chunk (default {DEFAULT_CHUNK_SIZE // 1024} KiB; "
        "chunks are opened in parallel)",
    )
    p.add_argument(
        "--suite",
        choices=SUITE_CHOICES,
        default=DEFAULT_SUITE,
        help=f"cipher suite of the chunks and digests (default {DEFAULT_SUITE}); chacha20poly1305-blake2b "
        "opens several times faster on boards without AES/SHA instructions (Pi 4, Pi Zero 2 W); auto: "
        "chosen from the --profile of the recipients",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME",
        help="a recipient's device profile (repeatable), read by --suite auto",
    )
    harden = p.add_argument_group(
        "output hardening (docs/security.md): any of these declares the manifest's output block, which "
        "every path a result leaves the device honours; none (and no 'output' in --meta): undeclared, raw "
        "output tensors leave when there is no postprocess")
    harden.add_argument("--top-k", type=int, metavar="N",
                        help="at most N classes / detections per result, e.g. --top-k 1 (default: all)")
    harden.add_argument("--round-decimals", type=int, metavar="N",
                        help="scores rounded to N (0..6) decimals, e.g. --round-decimals 2 "
                        "(default: as computed)")
    raw = harden.add_mutually_exclusive_group()
    raw.add_argument("--no-raw-logits", dest="raw_logits", action="store_false", default=None,
                     help="raw output tensors never leave (the default once any hardening flag is given)")
    raw.add_argument("--raw-logits", dest="raw_logits", action="store_true",
                     help="raw output tensors may leave when there is no postprocess (rounded/noised as "
                     "declared)")
    harden.add_argument("--noise", metavar="KIND:SCALE",
                        help="calibrated noise on every score: laplace:0.01 (scale b) or gaussian:0.01 "
                        "(standard deviation), drawn per request from os.urandom (default: none)")
    p.add_argument(
        "--adversarial",
        choices=("flag", "reject"),
        help="declare the feature-squeezing adversarial-input detector (docs/security.md): flag results or "
        "reject inputs; its threshold is calibrated on --adversarial-data (default: off)",
    )
    p.add_argument("--adversarial-fpr", type=float, default=0.05, metavar="RATE",
                   help="false-positive rate on clean inputs the threshold is calibrated for (default: 0.05)")
    p.add_argument("--adversarial-data", type=Path, metavar="NPZ",
                   help="clean calibration inputs: one array per model input, samples along the first axis "
                   "(at least 1/RATE of them; default: the golden inputs)")
    p.add_argument("--adversarial-bits", type=int, default=4, metavar="N",
                   help="bit-depth squeezer, bits; 0 = off (default: 4)")
    p.add_argument("--adversarial-median", type=int, default=2, metavar="K",
                   help="median squeezer window over the image axes; 0 = off (default: 2)")
    p.add_argument("--adversarial-joint", action="store_true",
                   help="one squeezed version (bits, then median) instead of one per squeezer: one extra "
                   "model run instead of two, for models whose run dominates the cost (default: separate)")
    p.add_argument("--adversarial-squeezers", metavar="LIST",
                   help="an explicit squeezer set scored as the largest normalised distance, instead of "
                   "--adversarial-bits/-median/-joint: comma-separated bitsN (1..16) and medianK (2..7), at "
                   "most 4, e.g. bits4,bits5 (what `edgeguard robustness --search` chose for digits; "
                   "default: none)")
    p.add_argument(
        "-o", "--output", required=True, type=Path, metavar="OUT.egm", help="the sealed bundle to write"
    )
    p.set_defaults(handler=_pack)

    p = sub.add_parser(
        "verify",
        help="verify a bundle (and decrypt it in memory with --device-key)",
        description=_VERIFY_HELP,
        formatter_class=_RAW,
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    add_trust_args(p)
    p.add_argument("--device-key", type=Path, metavar="KEY", help="device.key: also decrypt and check digest")
    p.add_argument("--state", type=Path, metavar="DIR", help="state directory holding rollback floors")
    p.add_argument(
        "--commit",
        action="store_true",
        help="after full verification, raise the rollback floor (needs --state and --device-key)",
    )
    p.add_argument("--json", action="store_true", help="print the verified manifest as JSON")
    p.set_defaults(handler=_verify)

    p = sub.add_parser(
        "inspect",
        help="print a bundle's manifest as JSON (signature not checked)",
        description=_INSPECT_HELP,
        formatter_class=_RAW,
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE")
    p.set_defaults(handler=_inspect)


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """--trust/--revoked/--revocation-list, for every command that opens bundles (read by trust_from_args)."""
    p.add_argument(
        "--trust",
        required=True,
        action="append",
        type=Path,
        metavar="PUB",
        help="a trusted publisher.pub (repeat: several keys are trusted during a rotation)",
    )
    p.add_argument(
        "--revoked",
        action="append",
        default=[],
        metavar="KEYID",
        help="refuse bundles signed by this key id (repeatable)",
    )
    p.add_argument(
        "--revocation-list",
        type=Path,
        metavar="FILE",
        help="file with one revoked key id per line ('#' starts a comment)",
    )


def trust_from_args(args: argparse.Namespace) -> TrustStore:
    """The trust store described by --trust/--revoked/--revocation-list (shared with `infer` and `run`)."""
    return TrustStore.from_files(args.trust, revocation_list=args.revocation_list, revoked=args.revoked)


def _keygen(args: argparse.Namespace) -> int:
    key, pub, kid = generate_keypair(args.kind, args.out)
    print(f"{args.kind} key {kid}: private {key} (0600), public {pub}")
    return 0


def _parse_expiry(text: str) -> datetime:
    """``--expires``: an ISO 8601 time with a timezone, or a date alone, which means 00:00 UTC that day
    (a device compares against its UTC clock; a local time without offset would mean a different instant on
    the publisher's and on each device's machine, so it is refused)."""
    value = text.strip()
    if "T" not in value and " " not in value:  # a date alone (a trailing Z is harmless there)
        try:
            day = date.fromisoformat(value.removesuffix("Z").removesuffix("z"))
        except ValueError:
            raise ConfigError(f"--expires {text!r} is not an ISO 8601 date or time") from None
        return datetime.combine(day, time(0, 0), tzinfo=timezone.utc)
    try:
        # Python 3.10's fromisoformat does not take the "Z" suffix: spell it as the offset it stands for.
        t = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value)
    except ValueError:
        raise ConfigError(f"--expires {text!r} is not an ISO 8601 date or time") from None
    if t.tzinfo is None:
        raise ConfigError(
            f"--expires {text!r} needs a timezone: {value}Z for UTC, or an offset such as {value}+02:00"
        )
    return t


def _checked_expiry(args: argparse.Namespace, now: datetime) -> datetime | None:
    if not args.expires:
        return None
    not_after = _parse_expiry(args.expires)
    if not_after <= now and not args.force:
        raise ConfigError(
            f"--expires {args.expires!r} is in the past ({not_after.isoformat()}): every device would refuse "
            "the bundle as expired (--force packs it anyway)"
        )
    return not_after


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, data, mode=0o644)  # a bundle is encrypted and signed: readable like any package
    except OSError as exc:
        # The error names atomic_write's temporary file, which the user never asked for: name their path.
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _pack(args: argparse.Namespace) -> int:
    if args.version < 0:
        raise ConfigError("--version must be a non-negative integer")
    not_after = _checked_expiry(args, datetime.now(timezone.utc))
    if not args.output.parent.is_dir():  # before the sealing work, not after it
        raise ConfigError(f"-o {args.output}: directory {args.output.parent} does not exist")
    model, model_format = read_model(args.model)
    meta = load_meta(args.meta) if args.meta else None
    hardening = _output_flags(args)
    if hardening:
        meta = dict(meta or {})
        meta["output"] = {**(meta.get("output") or {}), **hardening}
    golden: Any = load_golden_npz(args.golden) if args.golden else ()
    if args.golden_from:
        from ._golden import golden_from_images  # noqa: PLC0415 - loads the image preprocessing only here

        golden = golden_from_images(args.golden_from, model=model, model_format=model_format, meta=meta or {})
    if args.adversarial:
        meta = _with_adversarial(args, model, model_format, meta or {}, golden)
    data = pack_bundle(
        model,
        name=args.name,
        version=args.version,
        sign_key=load_publisher_key(args.sign_key),
        recipients=[load_recipient_key(p) for p in args.recipient],
        model_format=model_format,
        golden=golden,
        not_after=not_after,
        meta=meta,
        chunk_size=args.chunk_size,
        suite=args.suite,
        recipient_profiles=args.profile,
    )
    _write_atomic(args.output, data)
    print(
        f"sealed {args.name} v{args.version} ({model_format}, {len(model)} bytes) for "
        f"{len(args.recipient)} recipient(s) -> {args.output} ({len(data)} bytes)"
    )
    return 0


def _with_adversarial(args: argparse.Namespace, model: bytes, model_format: ModelFormat,
                      meta: dict[str, Any], golden: Any) -> dict[str, Any]:
    """``meta`` with ``defence`` calibrated on --adversarial-data (else the golden inputs)."""
    from edgeguard.bundle._reference import introspect  # noqa: PLC0415
    from edgeguard.robustness._calibrate import (  # noqa: PLC0415
        adversarial_defence,
        load_clean_samples,
        parse_squeezer_list,
    )

    if args.adversarial_data is not None:
        names = ([t["name"] for t in meta["inputs"]] if "inputs" in meta
                 else [t.name for t in introspect(model, model_format)[0]])
        samples = load_clean_samples(args.adversarial_data, names)
    else:
        samples = [dict(s["in"]) for s in golden]
    defence = adversarial_defence(model, model_format, meta=meta, samples=samples, mode=args.adversarial,
                                  fpr=args.adversarial_fpr, bits=args.adversarial_bits,
                                  median=args.adversarial_median, joint=args.adversarial_joint,
                                  squeezers=(parse_squeezer_list(args.adversarial_squeezers)
                                             if args.adversarial_squeezers is not None else None))
    return {**meta, "defence": defence}
def _output_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest's ``output`` keys given on the command line (checked by the device's own reader)."""
    out: dict[str, Any] = {}
    if args.top_k is not None:
        out["top_k"] = args.top_k
    if args.round_decimals is not None:
        out["round_decimals"] = args.round_decimals
    if args.raw_logits is not None:
        out["raw_logits"] = args.raw_logits
    if args.noise is not None:
        kind, _, scale = args.noise.partition(":")
        try:
            out["noise"] = {"kind": kind, "scale": float(scale)}
        except ValueError:
            raise ConfigError(f"--noise {args.noise!r}: expected KIND:SCALE, e.g. laplace:0.01") from None
    return out


def _verify(args: argparse.Namespace) -> int:
    if args.commit and (args.state is None or args.device_key is None):
        raise ConfigError("--commit needs --state and --device-key (the floor moves only after decryption)")
    trust = trust_from_args(args)
    if args.device_key is not None:
        harden_process(lock_core_limit=False)  # about to hold the device key and the plaintext
        opened = open_bundle(
            args.bundle,
            trust=trust,
            device_key=load_device_key(args.device_key),
            state_dir=args.state,
            commit_floor=False,
        )
        # A verification tool can afford the extra pass: the plaintext must match the signed SHA-256 too.
        opened.verify_payload_digest()
        if args.commit:
            opened.commit_rollback_floor()
        manifest, what = opened.manifest, "signature, chunk digests, decryption and plaintext SHA-256"
        opened.wipe()
    else:
        manifest = verify_bundle(args.bundle, trust=trust, state_dir=args.state).manifest
        what = "signature and chunk digests (not decrypted: no --device-key)"
    if args.json:
        json.dump(manifest.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(
            f"ok: {manifest.name} v{manifest.version} ({manifest.format}, {manifest.payload_size} bytes) "
            f"signed by {manifest.publisher_key_id}; checked {what}"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    json.dump(inspect_bundle(args.bundle), sys.stdout, indent=2)
    print()
    return 0



__all__ = ["register", "add_trust_args", "trust_from_args"]

"""Keys and the device's trust policy: who may make bundles this device imports.

Ed25519 through ``cryptography`` (pyca). Why that library: it is what paramiko, the
packer's SSH transport, already depends on, so the packer gains nothing new; Debian
ships it (``python3-cryptography``, 38.x in bookworm), so a device gains one well-kept
package, and only when it enforces signatures; and it is OpenSSL's audited Ed25519, not
Python code of our own. It is imported lazily, only to check a signature: a device without a trust policy
never needs it, and one with a policy reads its keys (and reports them) without it.

Key files are PEM: ``PREFIX.key`` is PKCS#8 (mode 0600), ``PREFIX.pub`` is
SubjectPublicKeyInfo, so ``openssl pkey`` reads both. A key's id is ``ed25519:`` and
the first 32 hex digits of the sha256 of its 32 raw public bytes.

The policy is every key given with ``--trust`` plus every ``*.pub`` in the trust
directory (``/etc/edgebundle/trusted.d``; ``--trust-dir``, ``$EDGEBUNDLE_TRUST_DIR``).
With at least one key the device *enforces*: a bundle must carry a valid signature by
one of them (FORMAT.md, "Signatures"). With none, bundles import as before. A trust
file that cannot be read is an error, never a smaller policy: failing open would turn
a typo into "accept anything".
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from .errors import TrustError, UsageError
from .format import FEATURE_SIGNATURE, BundleReader, Header
from .state import StateDir

DEFAULT_TRUST_DIR = "/etc/edgebundle/trusted.d"
TRUST_DIR_ENV = "EDGEBUNDLE_TRUST_DIR"
KEY_ID_PREFIX = "ed25519:"
_MAX_KEY_FILE = 64 * 1024

SIGN_HINT = "pack it with `edgebundle pack --sign KEY` using a key this device trusts"


def _crypto() -> Any:
    """The ``cryptography`` Ed25519 module, or a one-line error saying how to get it."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UsageError("signatures need the 'cryptography' package, which is not installed",
                         "apt-get install python3-cryptography, or pip install "
                         "'edgebundle[signing]'") from None
    return ed25519


def _serialization() -> Any:
    _crypto()
    from cryptography.hazmat.primitives import serialization
    return serialization


def key_id(raw_public: bytes) -> str:
    return KEY_ID_PREFIX + hashlib.sha256(raw_public).hexdigest()[:32]


def _raw_public(public: Any) -> bytes:
    ser = _serialization()
    return bytes(public.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and the file it came from."""

    key_id: str
    raw: bytes
    source: str

    def verify(self, signature: bytes, message: bytes) -> bool:
        ed25519 = _crypto()
        from cryptography.exceptions import InvalidSignature
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SigningKey:
    """A private key that signs bundle headers (``format.Signer``)."""

    def __init__(self, private: Any, source: str) -> None:
        self._private = private
        self.source = source
        self.key_id = key_id(_raw_public(private.public_key()))

    def sign(self, message: bytes) -> bytes:
        return bytes(self._private.sign(message))


def _read_key_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}", "check the path") from None
    if len(data) > _MAX_KEY_FILE:
        raise UsageError(f"{what} {path} is not a key file (over {_MAX_KEY_FILE} bytes)",
                         "pass the PREFIX.pub / PREFIX.key that `edgebundle key generate` wrote")
    return data


# DER of an Ed25519 SubjectPublicKeyInfo up to the key (RFC 8410): SEQUENCE { SEQUENCE {
# OID 1.3.101.112 }, BIT STRING of 33 bytes }. Every Ed25519 .pub is this prefix + 32 bytes,
# so a device reads its trust policy (and reports its key ids) without cryptography.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")
_PEM_BEGIN, _PEM_END = b"-----BEGIN PUBLIC KEY-----", b"-----END PUBLIC KEY-----"


def load_public_key(path: str) -> PublicKey:
    """A ``.pub`` file: PEM SubjectPublicKeyInfo of an Ed25519 key."""
    data = _read_key_file(path, "public key")
    begin, end = data.find(_PEM_BEGIN), data.find(_PEM_END)
    if begin < 0 or end < begin:
        raise UsageError(f"public key {path} is not a PEM public key",
                         "pass the PREFIX.pub that `edgebundle key generate` wrote")
    try:
        der = base64.b64decode(b"".join(data[begin + len(_PEM_BEGIN):end].split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"public key {path} is not a PEM public key (bad base64)",
                         "pass the PREFIX.pub that `edgebundle key generate` wrote") from None
    if len(der) != len(_ED25519_SPKI) + 32 or not der.startswith(_ED25519_SPKI):
        raise UsageError(f"public key {path} is not an Ed25519 key",
                         "edgebundle signs with Ed25519: `edgebundle key generate --out PREFIX`")
    raw = der[len(_ED25519_SPKI):]
    return PublicKey(key_id(raw), raw, path)


def load_signing_key(path: str) -> SigningKey:
    """A ``.key`` file: PEM PKCS#8 Ed25519, readable by its owner only (as ssh insists)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"cannot read signing key {path}: {exc.strerror}", "check the path") from None
    if stat.S_IMODE(mode) & 0o077:
        raise UsageError(f"signing key {path} is readable by others (mode "
                         f"{stat.S_IMODE(mode):04o})", f"chmod 600 {path}")
    data = _read_key_file(path, "signing key")
    ser, ed25519 = _serialization(), _crypto()
    try:
        private = ser.load_pem_private_key(data, password=None)
    except TypeError:
        raise UsageError(f"signing key {path} is encrypted", "edgebundle reads unencrypted "
                         "PKCS#8 keys; keep the key on a protected machine instead") from None
    except ValueError:
        raise UsageError(f"signing key {path} is not a PEM private key",
                         "pass the PREFIX.key that `edgebundle key generate` wrote") from None
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise UsageError(f"signing key {path} is not an Ed25519 key",
                         "edgebundle signs with Ed25519: `edgebundle key generate --out PREFIX`")
    return SigningKey(private, path)


@dataclass(frozen=True)
class GeneratedKey:
    key_id: str
    private_path: str
    public_path: str


def generate_key(prefix: str) -> GeneratedKey:
    """Write ``PREFIX.key`` (0600, never over an existing file) and ``PREFIX.pub``."""
    ser, ed25519 = _serialization(), _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    key_path, pub_path = prefix + ".key", prefix + ".pub"
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists", "choose another --out PREFIX, or move "
                             "the old key away first (a key is never overwritten)")
    pem = private.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub = private.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        with open(pub_path, "xb") as out:
            out.write(pub)
    except OSError as exc:
        raise UsageError(f"cannot write key {prefix}: {exc.strerror}",
                         "check that the directory exists and is writable") from None
    return GeneratedKey(key_id(_raw_public(private.public_key())), key_path, pub_path)


# ---------------------------------------------------------------------------
# The device's policy


def trust_dir_path(explicit: Optional[str] = None) -> Path:
    return Path(explicit or os.environ.get(TRUST_DIR_ENV) or DEFAULT_TRUST_DIR)


@dataclass(frozen=True)
class TrustPolicy:
    """The keys this device trusts; ``enforced`` when there is at least one."""

    keys: Tuple[PublicKey, ...]
    directory: str

    @property
    def enforced(self) -> bool:
        return bool(self.keys)

    @property
    def key_ids(self) -> Tuple[str, ...]:
        return tuple(sorted({k.key_id for k in self.keys}))

    @classmethod
    def load(cls, files: Sequence[str] = (), directory: Optional[str] = None) -> "TrustPolicy":
        where = trust_dir_path(directory)
        paths = list(files)
        if where.is_dir():
            try:
                paths += sorted(str(p) for p in where.iterdir() if p.name.endswith(".pub"))
            except OSError as exc:
                raise UsageError(f"cannot list the trust directory {where}: {exc.strerror}",
                                 "fix its permissions: a policy that cannot be read is not "
                                 "ignored") from None
        elif directory is not None and where.exists():
            raise UsageError(f"--trust-dir {where} is not a directory", "pass a directory of *.pub files")
        return cls(tuple(load_public_key(p) for p in paths), str(where))

    def admit(self, reader: BundleReader) -> Optional[str]:
        """Decide on a bundle's header; the id of the trusted key that signed it, or None.

        Runs before any entry is read (``BundleReader(verifier=...)``), so a refused
        bundle never reaches the runtime.
        """
        name = reader.name
        if not self.enforced:
            return None  # no policy: signed or not, the bundle reads as before
        if not reader.signatures:
            raise TrustError(f"bundle {name} is not signed, and this device imports only bundles "
                             f"signed by a trusted key ({', '.join(self.key_ids)})", SIGN_HINT)
        known = {k.key_id: k for k in self.keys}
        signers = [s for s in reader.signatures if s.key_id in known]
        if not signers:
            ids = ", ".join(s.key_id for s in reader.signatures)
            raise TrustError(f"bundle {name} is signed by {ids}, a key this device does not trust "
                             f"(trusted: {', '.join(self.key_ids)})",
                             f"{SIGN_HINT}, or add its .pub to {self.directory}")
        for sig in signers:
            try:
                valid = known[sig.key_id].verify(sig.signature, reader.signed_message)
            except UsageError as exc:  # no crypto library: refuse, never wave it through
                raise TrustError(f"bundle {name} cannot be checked: {exc.message}", exc.hint) from None
            if valid:
                return sig.key_id
        raise TrustError(f"bundle {name}: the signature by {signers[0].key_id} does not match "
                         "its header (the bundle was altered after signing)",
                         "do not use it; get a fresh copy from the packer")


# ---------------------------------------------------------------------------
# Downgrades: an older signed bundle replayed to a device that has a newer one

DOWNGRADE_HINT = ("import a bundle packed after it (repack to roll back on purpose), or pass "
                  "--allow-downgrade if you mean to import this old one")


def _record_name(site: Optional[str]) -> str:
    key = site if site is not None else ""
    return f"signed/{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _parse_time(text: str) -> Optional[datetime.datetime]:
    """An RFC 3339 time with its zone (``Z`` included, which Python 3.9 does not read)."""
    try:
        when = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def _created(header: Header, name: str) -> datetime.datetime:
    when = _parse_time(header.created)
    if when is None:
        raise TrustError(f"bundle {name}: field 'created' is {header.created[:40]!r}, not an "
                         "RFC 3339 time with a zone", "repack it with edgebundle")
    return when


def _newest(state: StateDir, site: Optional[str]) -> Optional[Tuple[datetime.datetime, Any]]:
    """The mark of ``site``: when its newest imported signed bundle was packed, and the record."""
    last = state.read_json(_record_name(site))
    if not isinstance(last, dict) or last.get("site") != site:
        return None
    when = _parse_time(str(last.get("created")))
    return (when, last) if when is not None else None  # a damaged record: rewritten next time


def check_not_older(state: StateDir, header: Header, name: str) -> None:
    """Refuse a signed bundle packed before the newest signed one imported for its site.

    The record is per site because one device may take the bundles of several. Only
    signed bundles count: an unsigned one proves nothing about when it was made.
    """
    if FEATURE_SIGNATURE not in header.required_features:
        return
    mark = _newest(state, header.site)
    if mark is None:
        return
    newest, last = mark
    if _created(header, name) < newest:
        raise TrustError(f"bundle {name} was packed at {header.created}, before the bundle for "
                         f"site {header.site} this device already imported "
                         f"({last.get('bundle', '?')}, packed {last.get('created')}): refusing a "
                         "downgrade", DOWNGRADE_HINT)


def record_imported(state: StateDir, header: Header, name: str, key: Optional[str]) -> None:
    """Remember the newest signed bundle imported for its site (fsynced: survives a power cut)."""
    if FEATURE_SIGNATURE not in header.required_features or key is None:
        return
    when = _created(header, name)
    mark = _newest(state, header.site)
    if mark is not None and mark[0] > when:
        return  # --allow-downgrade: the newest stays the mark
    state.write_json(_record_name(header.site), {"site": header.site, "created": header.created,
                                                 "bundle": os.path.basename(name), "key_id": key})

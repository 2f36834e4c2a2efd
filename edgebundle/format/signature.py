"""Signed bundles (feature ``signature-v1``): what is signed, and the commitments.

A signature is over the header record alone, so a device can decide before the first
entry, in one streaming pass. The header in turn commits to everything else a device
acts on (FORMAT.md, "Signatures"):

- ``commitments.entries[i]`` = sha256 of entry record *i* (its typed fields, msgpack),
  checked as the record arrives, before any of its bytes are used; the record names
  the sha256 of the entry's decoded bytes, checked at the entry's end, as always;
- ``commitments.images`` = sha256 of the index's image records, checked with the index,
  before any image is created.

This module knows the bytes only: checking a signature needs a key and a crypto
library, which the caller brings (``edgebundle.trust``), so ``format`` stays free of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol, Sequence, Tuple, cast

import msgpack

from ..errors import BundleFormatError, TrustError
from . import FORMAT_VERSION, MAGIC, MAX_SIGNATURES, SIGNATURE_ALGORITHM, SIGNATURE_CONTEXT
from .records import SPEC_HINT, EntryHead, Header, ImageRecord, _Fields

SIGNATURE_SIZE = 64  # Ed25519
MAX_KEY_ID = 128

TAMPERED_HINT = ("the bundle was altered after it was signed: do not use it; get a fresh copy "
                 "from the packer")


class Signer(Protocol):
    """Signs a header (``edgebundle.trust.SigningKey``)."""

    key_id: str

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True)
class Signature:
    """One signature of the signature record."""

    algorithm: str
    key_id: str
    signature: bytes

    def to_wire(self) -> Dict[str, Any]:
        return {"algorithm": self.algorithm, "key_id": self.key_id, "signature": self.signature}


def signed_message(header_body: bytes, version: int = FORMAT_VERSION) -> bytes:
    """The bytes a signature covers: context, magic, version and the header record body."""
    return SIGNATURE_CONTEXT + MAGIC + version.to_bytes(2, "big") + header_body


def signature_record(signatures: Sequence[Signature]) -> Dict[str, Any]:
    return {"signatures": [s.to_wire() for s in signatures]}


def parse_signature_record(obj: object, name: str) -> Tuple[Signature, ...]:
    f = _Fields(obj, f"bundle {name} signature record")
    items = f.items("signatures")
    if not 1 <= len(items) <= MAX_SIGNATURES:
        raise f.fail("signatures", f"holds {len(items)} signatures, not 1 to {MAX_SIGNATURES}")
    out = []
    for i, item in enumerate(items):
        s = _Fields(item, f"bundle {name} signatures[{i}]")
        algorithm = s.choice("algorithm", (SIGNATURE_ALGORITHM,),
                             "this bundle needs a newer edgebundle")
        key_id = s.text("key_id")
        if not 0 < len(key_id) <= MAX_KEY_ID:
            raise s.fail("key_id", f"is {len(key_id)} characters long, not 1 to {MAX_KEY_ID}")
        if not key_id.isascii() or not key_id.isprintable() or " " in key_id:
            # It is printed in errors ("signed by KEY_ID"): no newline may split the line.
            raise s.fail("key_id", f"is {key_id[:40]!r}, not printable ASCII")
        sig = s.obj.get("signature")
        if not isinstance(sig, bytes) or len(sig) != SIGNATURE_SIZE:
            raise s.fail("signature", f"is not {SIGNATURE_SIZE} bytes of {algorithm} signature")
        out.append(Signature(algorithm, key_id, sig))
    return tuple(out)


def _sha256_msgpack(obj: Any) -> bytes:
    return hashlib.sha256(cast(bytes, msgpack.packb(obj, use_bin_type=True))).digest()


def entry_commitment(head: EntryHead) -> bytes:
    """sha256 of the entry record's typed fields (what the reader acts on)."""
    return _sha256_msgpack(head.to_wire())


def images_commitment(images: Sequence[ImageRecord]) -> bytes:
    return _sha256_msgpack([r.to_wire() for r in images])


def _refusal(signed: bool, message: str) -> Exception:
    # With a verified signature, a record that breaks the header's commitment is
    # tampering (its own checksum was recomputed); without one, it is only inconsistent.
    return TrustError(message, TAMPERED_HINT) if signed else BundleFormatError(message, SPEC_HINT)


def check_entry_commitment(head: EntryHead, header: Header, position: int, where: str,
                           signed: bool) -> None:
    """Entry ``position`` (0-based) is the one the header committed to."""
    commits = header.commitments
    if commits is None:
        return
    if position >= len(commits.entries):
        raise _refusal(signed, f"{where}: the header commits to {len(commits.entries)} entries, "
                       "the bundle carries more")
    if entry_commitment(head) != commits.entries[position]:
        raise _refusal(signed, f"{where} ({head.digest}) is not the entry its header "
                       f"commits to at position {position}")


def check_index_commitment(images: Sequence[ImageRecord], entries: int, header: Header,
                           name: str, signed: bool) -> None:
    commits = header.commitments
    if commits is None:
        return
    if entries != len(commits.entries):
        raise _refusal(signed, f"bundle {name} carries {entries} entries, its header commits "
                       f"to {len(commits.entries)}")
    if images_commitment(images) != commits.images:
        raise _refusal(signed, f"bundle {name}: the index's image records are not the ones "
                       "its header commits to")


def key_ids(signatures: Optional[Sequence[Signature]]) -> Tuple[str, ...]:
    return tuple(s.key_id for s in signatures or ())

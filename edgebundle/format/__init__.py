"""The bundle format: the only code that knows bundle bytes. Spec: ``docs/FORMAT.md``.

The constants below are mirrored in FORMAT.md's constants table; a unit test holds
the two together, so change both or neither.
"""

from __future__ import annotations

from typing import FrozenSet

MAGIC = b"\x89EBD\r\n\x1a\n"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

TAG_HEADER = 0x48  # 'H'
TAG_ENTRY = 0x45  # 'E'
TAG_INDEX = 0x49  # 'I'
TAG_FOOTER = 0x46  # 'F'
TAG_SIGNATURE = 0x53  # 'S': right after the header, in bundles that require signature-v1
END_MAGIC = b"EBDEND\r\n"
FOOTER_SIZE = 33  # tag(1) + index offset(8) + xxh3-128(16) + END_MAGIC(8)

CODEC_STORED = 0
CODEC_ZSTD = 1
CODECS = (CODEC_STORED, CODEC_ZSTD)

KIND_BLOB = "blob"
KIND_DELTA = "delta"  # rebuilds a layer's uncompressed tar from the site's own files
ENTRY_KINDS = (KIND_BLOB, KIND_DELTA)

# The feature a bundle with delta entries requires (FORMAT.md, "Delta entries").
FEATURE_DELTA = "tar-delta-v1"

# The feature a signed bundle requires (FORMAT.md, "Signatures"): a signature record
# follows the header, and the header commits to every entry record and image record.
FEATURE_SIGNATURE = "signature-v1"
SIGNATURE_ALGORITHM = "ed25519"
# Prefixed to what is signed, so a signature over a bundle header can never be taken for
# a signature over anything else made with the same key.
SIGNATURE_CONTEXT = b"edgebundle bundle header signature v1\x00"
MAX_SIGNATURES = 8  # co-signatures (key rotation); more is never needed

# Delta op codes and bounds: what a device must hold in memory per op.
OP_LITERAL = 0  # [0, bytes]
OP_COPY = 1  # [1, file]
OP_PATCH = 2  # [2, file, offset, length, size, frame]
OP_RANGE = 3  # [3, base, offset, length]: bytes of a base layer's own tar
OP_FILE = 4  # [4, base, path, size, sha256]: defines the next base file (verified before use)
MAX_LITERAL = 1024 * 1024  # bytes of one literal op
MAX_PATCH_WINDOW = 8 * 1024 * 1024  # base bytes one patch op may use as its dictionary
MAX_PATCH_OUTPUT = 8 * 1024 * 1024  # bytes one patch op may produce
MAX_PATCH_WINDOW_LOG = 24  # patch frames needing more than 16 MiB of window are refused

LAYER_FORM_BLOB = "blob"  # the registry's compressed blob, byte for byte
LAYER_FORM_TAR = "tar"  # the uncompressed layer tar (identity: diff_id)
LAYER_FORMS = (LAYER_FORM_BLOB, LAYER_FORM_TAR)

RUNTIME_CONTAINERD = "containerd"
RUNTIME_DOCKER = "docker"
RUNTIME_PODMAN = "podman"
RUNTIMES = (RUNTIME_CONTAINERD, RUNTIME_DOCKER, RUNTIME_PODMAN)
#: Runtimes that keep the registry's digests only when given the original blobs.
BLOB_RUNTIMES = (RUNTIME_CONTAINERD, RUNTIME_PODMAN)

# Records are bounded by what a 256 MiB device can decode (FORMAT.md, "Resource bounds").
# Python holds a msgpack object in up to ~70 bytes however small it is on the wire, so
# the object count, not the byte length, is what bounds memory.
MAX_RECORD_SIZE = 8 * 1024 * 1024  # header or index msgpack (edgebundle 0.2.0: 64 MiB)
MAX_ENTRY_RECORD_SIZE = 1024 * 1024  # one entry's record (a delta's bases included)
MAX_RECORD_OBJECTS = 512 * 1024  # msgpack objects one record decodes to (a container: 1 + items)
MAX_STRING = 1024 * 1024  # bytes of any one msgpack string in a record (known fields: less)
MAX_FIELD_STRING = 4096  # bytes of a string field the spec defines (names, media types, ...)
MAX_IMAGES = 1024  # images in one bundle
MAX_LAYERS = 1024  # layers of one image (Docker's overlay2 stops at 128)
MAX_ENTRIES = 65536  # entries in one bundle
MAX_PREREQUISITES = 32768  # prerequisites of one bundle (and bases of one delta entry)
MAX_FEATURES = 64  # required features of one bundle
MAX_CHUNK_SIZE = 4 * 1024 * 1024  # stored bytes in one chunk
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_WINDOW_LOG = 25  # readers refuse zstd frames needing more than 32 MiB of window
DEFAULT_WINDOW_LOG = 23  # writers cap the window at 8 MiB to keep devices' memory small

# Volumes (FORMAT.md, "Volumes"): a file that carries one consecutive slice of a bundle's
# bytes, so a bundle can be split over several files (FAT32 sticks hold < 4 GiB each).
VOLUME_MAGIC = b"\x89EBV\r\n\x1a\n"
VOLUME_VERSION = 1
VOLUME_END_MAGIC = b"EBVEND\r\n"
VOLUME_HEAD_SIZE = 66  # magic(8) + version(2) + id(16) + 2*u32 + 3*u64 + xxh3_64(8)
VOLUME_TRAILER_SIZE = 24  # xxh3-128 of the payload(16) + VOLUME_END_MAGIC(8)

# Required features this reader understands. A bundle naming any other feature in
# its header's "required_features" is refused before any entry is read.
KNOWN_FEATURES: FrozenSet[str] = frozenset({FEATURE_DELTA, FEATURE_SIGNATURE})

# The typed model and the streams that read and write it; they import the constants
# above, so they come after them.
from .records import (BaseLayer, Commitments, DeltaHead, EntryHead, Header,  # noqa: E402
                      ImageRecord, ImageSummary, Index, IndexEntry, LayerRecord, Prerequisite)
from .signature import Signature, Signer  # noqa: E402
from .delta import BaseFile  # noqa: E402
from .reader import BundleInfo, BundleReader, Entry, read_index, read_index_from  # noqa: E402
from .writer import BundleWriter  # noqa: E402

__all__ = [
    "BundleInfo", "BundleReader", "BundleWriter", "Entry", "read_index", "read_index_from",
    "BaseFile", "BaseLayer", "Commitments", "DeltaHead", "Signature", "Signer", "EntryHead", "Header", "ImageRecord", "ImageSummary", "Index", "IndexEntry", "LayerRecord",
    "Prerequisite",
    "MAGIC", "FORMAT_VERSION", "SUPPORTED_VERSIONS", "CODEC_STORED", "CODEC_ZSTD",
    "KIND_BLOB", "KIND_DELTA", "FEATURE_DELTA", "FEATURE_SIGNATURE", "LAYER_FORM_BLOB", "LAYER_FORM_TAR", "RUNTIMES", "RUNTIME_PODMAN", "BLOB_RUNTIMES",
]

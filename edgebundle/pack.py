"""Plan + blob cache -> bundle file, only through ``edgebundle.format``.

Entry encoding, decided per entry from what it is:

* index/manifest/config JSON: zstd (JSON shrinks 3-5x);
* a layer shipped as its registry blob that is already gzip/zstd-compressed: stored as
  is, since recompressing compressed bytes gains ~2% and costs a lot of CPU (see BENCHMARKS.md);
* an uncompressed layer (tar form for Docker, or an uncompressed registry blob): zstd.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, Optional

from .cache import BlobCache
from .compression import decompress_stream
from .format import CODEC_STORED, CODEC_ZSTD, LAYER_FORM_TAR, BundleWriter
from .model import MT_OCI_LAYER, Descriptor, Layer, ResolvedImage
from .plan import Plan

READ_SIZE = 1024 * 1024
Progress = Callable[[int], None]


@dataclass(frozen=True)
class PackResult:
    path: str
    bundle_bytes: int
    entries: int
    images: int
    ship_registry_bytes: int  # registry size of what ships (the plan's estimate)
    full_registry_bytes: int  # registry size of every image in full


def image_record(image: ResolvedImage, form: str) -> Dict[str, Any]:
    """The index's record for one image (FORMAT.md, "Image record")."""
    return {
        "name": image.name,
        "ref": str(image.ref),
        "platform": str(image.platform),
        "top": image.top.to_json(),
        "manifest": image.manifest.to_json(),
        "config": image.config.to_json(),
        "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size,
                    "diff_id": l.diff_id, "tar_size": l.tar_size, "form": form}
                   for l in image.layers],
    }


def _is_compressed(media_type: str) -> bool:
    return media_type.endswith(("gzip", "+zstd", ".zstd"))


def _file_pieces(fh: BinaryIO, progress: Optional[Progress]) -> Iterator[bytes]:
    while True:
        piece = fh.read(READ_SIZE)
        if not piece:
            return
        if progress:
            progress(len(piece))
        yield piece


def decompressed_pieces(fh: BinaryIO, media_type: str,
                        progress: Optional[Progress] = None) -> Iterator[bytes]:
    """The uncompressed tar of a layer blob, streamed (progress counts blob bytes)."""
    kind = "gzip" if media_type.endswith("gzip") else \
        "zstd" if _is_compressed(media_type) else "none"
    counted = _Counted(fh, progress) if progress else fh
    return decompress_stream(counted, kind)  # type: ignore[arg-type]


class _Counted:
    def __init__(self, fh: BinaryIO, progress: Progress) -> None:
        self._fh = fh
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._progress(len(data))
        return data


def write_bundle(plan: Plan, cache: BlobCache, output: "os.PathLike[str] | str", *,
                 level: int = 16, threads: int = 1,
                 progress: Optional[Progress] = None) -> PackResult:
    """Write the bundle for ``plan`` to ``output`` atomically (temp file + rename).

    Every blob the plan ships must be in ``cache`` (``resolve.fetch_layers``).
    """
    out_path = Path(output)
    header = {
        "content_bytes": _content_bytes(plan),
        "site": plan.site,
        "runtime": plan.runtime,
        "namespace": plan.namespace,
        "platform": plan.platform,
        "layer_form": plan.layer_form,
        "prerequisites": [p.to_json() for p in plan.prerequisites],
        "images": [{"name": p.image.name, "top": p.image.top.digest,
                    "config": p.image.config.digest} for p in plan.to_ship],
    }
    fd, tmp = tempfile.mkstemp(dir=out_path.parent or ".", prefix=out_path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            writer = BundleWriter(fh, header, level=level, threads=threads)
            written: set = set()
            for ip in plan.to_ship:
                for desc in reversed(ip.image.json_blobs):  # config, manifest, index
                    if desc.digest not in written:
                        _add_json(writer, cache, desc)
                        written.add(desc.digest)
                for lp in ip.layers:
                    if lp.ship and lp.entry not in written:
                        _add_layer(writer, cache, lp.layer, plan.layer_form, progress)
                        written.add(lp.entry)
            total = writer.finish([image_record(p.image, plan.layer_form) for p in plan.to_ship])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return PackResult(str(out_path), total, len(writer.entries), len(plan.to_ship),
                      plan.ship_bytes, plan.full_bytes)


def _content_bytes(plan: Plan) -> int:
    """Decoded bytes of every entry the bundle will carry (the importer's progress total)."""
    total = 0
    for layer, size in plan.shipped().values():
        tar = layer is not None and plan.layer_form == LAYER_FORM_TAR and \
            _is_compressed(layer.media_type)
        total += layer.tar_size if tar and layer is not None else size
    return total


def _add_json(writer: BundleWriter, cache: BlobCache, desc: Descriptor) -> None:
    data = cache.read_bytes(desc.digest)
    writer.add_blob(desc.digest, desc.size, [data], codec=CODEC_ZSTD, media_type=desc.media_type)


def _add_layer(writer: BundleWriter, cache: BlobCache, layer: Layer, form: str,
               progress: Optional[Progress]) -> None:
    with cache.open(layer.digest) as fh:
        if form == LAYER_FORM_TAR and _is_compressed(layer.media_type):
            if layer.tar_size < 0:
                raise ValueError(f"layer {layer.digest} has no recorded tar size; fetch it first")
            writer.add_blob(layer.diff_id, layer.tar_size,
                            decompressed_pieces(fh, layer.media_type, progress),
                            codec=CODEC_ZSTD, media_type=MT_OCI_LAYER)
        elif form == LAYER_FORM_TAR or not _is_compressed(layer.media_type):
            # Already an uncompressed tar: its blob digest is its diff_id.
            writer.add_blob(layer.digest, layer.size, _file_pieces(fh, progress),
                            codec=CODEC_ZSTD, media_type=layer.media_type)
        else:
            writer.add_blob(layer.digest, layer.size, _file_pieces(fh, progress),
                            codec=CODEC_STORED, media_type=layer.media_type)

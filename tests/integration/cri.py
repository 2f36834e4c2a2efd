"""Minimal CRI v1 ImageService client (ListImages, ImageStatus).

Needs only ``grpcio`` (no protobuf package, no generated stubs): requests are
encoded and responses decoded by hand following
kubernetes/cri-api pkg/apis/runtime/v1/api.proto:

    message ImageSpec          { string image = 1; map<string,string> annotations = 2; ... }
    message ListImagesRequest  { ImageFilter filter = 1; }        // ImageFilter { ImageSpec image = 1; }
    message ListImagesResponse { repeated Image images = 1; }
    message ImageStatusRequest { ImageSpec image = 1; bool verbose = 2; }
    message ImageStatusResponse{ Image image = 1; map<string,string> info = 2; }
    message Image { string id = 1; repeated string repo_tags = 2; repeated string repo_digests = 3;
                    uint64 size = 4; Int64Value uid = 5; string username = 6; ImageSpec spec = 7;
                    bool pinned = 8; }

ImageStatus of an unknown image is *not* an error in CRI: the response simply
has no ``image`` field -> ``None`` here.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import grpc

SERVICE = "/runtime.v1.ImageService/"
DEFAULT_TIMEOUT = 10.0

# --------------------------------------------------------------------------
# protobuf wire format (just what we need)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(data)) + data


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value); value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos : pos + n], pos + n
        elif wt == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wt == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, val


def _image_spec(ref: str) -> bytes:
    return _field_bytes(1, ref.encode())


def _decode_map(entries: list[bytes]) -> dict[str, str]:
    out = {}
    for e in entries:
        k = v = ""
        for num, _, val in _fields(e):
            if num == 1:
                k = val.decode()
            elif num == 2:
                v = val.decode()
        out[k] = v
    return out


def _decode_image(buf: bytes) -> dict[str, Any]:
    img: dict[str, Any] = {"id": "", "repo_tags": [], "repo_digests": [], "size": 0}
    for num, _, val in _fields(buf):
        if num == 1:
            img["id"] = val.decode()
        elif num == 2:
            img["repo_tags"].append(val.decode())
        elif num == 3:
            img["repo_digests"].append(val.decode())
        elif num == 4:
            img["size"] = val
        elif num == 5:  # Int64Value
            img["uid"] = next((v for n, _, v in _fields(val) if n == 1), 0)
        elif num == 6:
            img["username"] = val.decode()
        elif num == 8:
            img["pinned"] = bool(val)
    return img


# --------------------------------------------------------------------------
# gRPC


def _call(sock: str, method: str, request: bytes, timeout: float) -> bytes:
    target = sock if sock.startswith("unix:") else f"unix://{sock}"
    # Default authority for unix targets is the path; keep it short and valid.
    with grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")]) as ch:
        fn = ch.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        return fn(request, timeout=timeout)


def list_images(sock: str, *, filter_ref: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    """ListImages -> [{id, repo_tags, repo_digests, size, ...}] (CRI's view of namespace k8s.io)."""
    req = b""
    if filter_ref:
        req = _field_bytes(1, _field_bytes(1, _image_spec(filter_ref)))
    resp = _call(sock, "ListImages", req, timeout)
    return [_decode_image(val) for num, _, val in _fields(resp) if num == 1]


def image_status(
    sock: str, ref: str, *, verbose: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> Optional[dict[str, Any]]:
    """ImageStatus(ref) -> image dict, or None when CRI does not know ``ref``.

    With ``verbose=True`` the response's ``info`` map is added as ``"info"``.
    """
    req = _field_bytes(1, _image_spec(ref))
    if verbose:
        req += _field_varint(2, 1)
    resp = _call(sock, "ImageStatus", req, timeout)
    image = None
    info: list[bytes] = []
    for num, _, val in _fields(resp):
        if num == 1:
            image = _decode_image(val)
        elif num == 2:
            info.append(val)
    if image is not None and verbose:
        image["info"] = _decode_map(info)
    return image


def ready(sock: str, timeout: float = 2.0) -> bool:
    """True once the CRI plugin answers (it returns 'not initialized' early on)."""
    try:
        list_images(sock, timeout=timeout)
        return True
    except grpc.RpcError:
        return False

"""The Kubernetes Container Runtime Interface's image pull, called the way the kubelet calls it: over containerd's
unix socket, with gRPC, so the containerd daemon itself resolves and fetches.

Debian bookworm has no crictl and these tests have no generated stubs: the two messages a pull needs are small enough
to encode by hand (protobuf wire format: a key varint `field << 3 | wire type`, then for wire type 2 a length varint
and that many bytes).

    PullImageRequest  { ImageSpec image = 1; AuthConfig auth = 2; PodSandboxConfig sandbox_config = 3; }
    ImageSpec         { string image = 1; map<string, string> annotations = 2; }
    PullImageResponse { string image_ref = 1; }

containerd 1.6 serves the API as `runtime.v1` and as the older `runtime.v1alpha2`; v1 is asked first.
"""

from collections.abc import Iterator
from pathlib import Path

import grpc

_API_VERSIONS = ("runtime.v1", "runtime.v1alpha2")
_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5


def encode_varint(value: int) -> bytes:
    """A non-negative int as a protobuf varint: 7 bits a byte, least significant first, the high bit set on every
    byte but the last."""
    if value < 0:
        raise ValueError(f"a varint here is never negative: {value}")
    encoded = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            encoded.append(low)
            return bytes(encoded)
        encoded.append(low | 0x80)


def decode_varint(data: bytes, position: int = 0) -> tuple[int, int]:
    """The varint that starts at `data[position]`: (its value, the position just after it)."""
    value = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("a varint runs past the end of the message")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _length_delimited(field: int, payload: bytes) -> bytes:
    return encode_varint(field << 3 | _LENGTH_DELIMITED) + encode_varint(len(payload)) + payload


def _fields(message: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of an encoded message: an int for a varint, bytes for the others."""
    position = 0
    while position < len(message):
        key, position = decode_varint(message, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = decode_varint(message, position)
            yield field, value
        elif wire_type == _LENGTH_DELIMITED:
            length, position = decode_varint(message, position)
            if position + length > len(message):
                raise ValueError(f"field {field} runs past the end of the message")
            yield field, message[position : position + length]
            position += length
        elif wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
            yield field, message[position : position + size]
            position += size
        else:
            raise ValueError(f"field {field} has wire type {wire_type}, which no CRI message here uses")


def pull_image_request(image: str) -> bytes:
    """PullImageRequest{image: ImageSpec{image: `image`}}, no auth, no sandbox config."""
    return _length_delimited(1, _length_delimited(1, image.encode()))


def image_ref_of(response: bytes) -> str:
    """PullImageResponse.image_ref: what the runtime calls the pulled image (containerd: its config's digest)."""
    refs = [value for field, value in _fields(response) if field == 1 and isinstance(value, bytes)]
    if len(refs) != 1:
        raise ValueError(f"a PullImageResponse with {len(refs)} image_ref fields: {response!r}")
    return refs[0].decode()


def pull_image(socket_path: Path, image: str, timeout: float = 180) -> str:
    """ImageService/PullImage for `image` over the CRI socket at `socket_path`; returns the response's image_ref.
    Raises grpc.RpcError as the runtime answered (or when `timeout` s pass)."""
    # No gRPC proxy for this channel whatever the environment says: only the runtime's own pull may use one.
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"unix://{socket_path}", options=options) as channel:
        for version in _API_VERSIONS:
            pull = channel.unary_unary(
                f"/{version}.ImageService/PullImage", request_serializer=None, response_deserializer=None
            )
            try:
                response = pull(pull_image_request(image), timeout=timeout)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED and version != _API_VERSIONS[-1]:
                    continue
                raise
            return image_ref_of(response)
    raise AssertionError("unreachable: the last API version either answers or raises")

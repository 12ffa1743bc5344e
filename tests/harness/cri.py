"""A minimal CRI image client: the kubelet's path to a pull, where the containerd daemon does the HTTPS.

Debian 12 has no crictl, so this speaks gRPC (grpcio) over containerd's socket with the few protobuf
messages of ``ImageService`` encoded by hand. containerd 1.6 serves ``runtime.v1`` and the older
``runtime.v1alpha2``: the client tries v1 and falls back to v1alpha2 when v1 is unimplemented.

    with CriImageClient(containerd.socket) as cri:
        image_id = cri.pull_image("123456789012.dkr.ecr.us-east-1.amazonaws.com/team/app:v1")
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

API_VERSIONS = ("v1", "v1alpha2")

# protobuf wire types
_VARINT = 0
_LENGTH_DELIMITED = 2


class CriError(RuntimeError):
    """The CRI call failed; ``code`` is the gRPC status code and ``details`` containerd's message."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.code = code
        self.details = details


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_field(number: int, value: bytes | str | int | bool) -> bytes:
    """One protobuf field: a varint for int/bool, length-delimited for str/bytes (an embedded message)."""
    if isinstance(value, bool | int):
        return _varint(number << 3 | _VARINT) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(data)) + data


def decode_message(data: bytes) -> dict[int, list[bytes | int]]:
    """Split a protobuf message into ``{field number: [values]}`` (varints as int, the rest as bytes)."""
    fields: dict[int, list[bytes | int]] = {}
    position = 0

    def read_varint() -> int:
        nonlocal position
        result = shift = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while position < len(data):
        key = read_varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value: bytes | int = read_varint()
        elif wire_type == _LENGTH_DELIMITED:
            length = read_varint()
            value = data[position:position + length]
            position += length
        elif wire_type == 1:  # fixed64
            value, position = data[position:position + 8], position + 8
        elif wire_type == 5:  # fixed32
            value, position = data[position:position + 4], position + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def image_spec(image: str) -> bytes:
    """``ImageSpec{image}``."""
    return encode_field(1, image)


def auth_config(username: str, password: str) -> bytes:
    """``AuthConfig{username, password}`` (what kubelet sends from an imagePullSecret)."""
    return encode_field(1, username) + encode_field(2, password)


def pull_image_request(image: str, username: str | None = None, password: str | None = None) -> bytes:
    """``PullImageRequest{image: ImageSpec, auth: AuthConfig?}``."""
    message = encode_field(1, image_spec(image))
    if username is not None:
        message += encode_field(2, auth_config(username, password or ""))
    return message


@dataclass(frozen=True)
class ImageStatus:
    """The fields of CRI's ``Image`` that tests look at."""

    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


def _strings(values: list[bytes | int]) -> tuple[str, ...]:
    return tuple(value.decode() for value in values if isinstance(value, bytes))


def parse_image(data: bytes) -> ImageStatus:
    """Decode a CRI ``Image`` message."""
    fields = decode_message(data)
    size = fields.get(4, [0])[0]
    return ImageStatus(_strings(fields.get(1, [b""]))[0], _strings(fields.get(2, [])),
                       _strings(fields.get(3, [])), size if isinstance(size, int) else 0)


class CriImageClient:
    """``runtime.v1[alpha2].ImageService`` over a containerd socket; ``api_version`` says which one
    answered."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 120) -> None:
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{os.fspath(socket_path)}")
        self.api_version: str | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriImageClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: str, request: bytes) -> bytes:
        versions = (self.api_version,) if self.api_version else API_VERSIONS
        for version in versions:
            path = f"/runtime.{version}.ImageService/{method}"
            call = self.channel.unary_unary(path)  # no serializers: bytes in, bytes out
            try:
                response = call(request, timeout=self.timeout)
            except grpc.RpcError as error:
                code = error.code()  # type: ignore[attr-defined]
                if code == grpc.StatusCode.UNIMPLEMENTED and self.api_version is None:
                    continue
                raise CriError(path, code, error.details()) from None  # type: ignore[attr-defined]
            self.api_version = version
            return response
        raise CriError(
            method, grpc.StatusCode.UNIMPLEMENTED, f"no ImageService among {', '.join(API_VERSIONS)}"
        )

    def pull_image(self, image: str, *, username: str | None = None, password: str | None = None) -> str:
        """Pull ``image`` (``host/repo:tag`` or ``@digest``) as kubelet would; return the image ref (its
        ID)."""
        response = decode_message(self._call("PullImage", pull_image_request(image, username, password)))
        return _strings(response.get(1, [b""]))[0]

    def image_status(self, image: str) -> ImageStatus | None:
        """The image as containerd's CRI knows it, or None when it does not have it."""
        response = decode_message(self._call("ImageStatus", encode_field(1, image_spec(image))))
        raw = response.get(1)
        return parse_image(raw[0]) if raw and isinstance(raw[0], bytes) else None

    def remove_image(self, image: str) -> None:
        """Remove an image (a no-op when it is absent)."""
        self._call("RemoveImage", encode_field(1, image_spec(image)))

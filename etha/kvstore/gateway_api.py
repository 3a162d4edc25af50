"""Wire protocol of etha's coordination extension RPCs, shared by library and gateway.

The etha gateway speaks etcd's v3 API and one more gRPC service, built here at import
time from a ``FileDescriptorProto`` (no protoc, no generated module). In ``.proto``
terms::

    syntax = "proto3";
    package etha.gateway.v1;

    service Coordination {
      // Block until a condition holds on the caller's keys; answer once, with the
      // matched keys. The gRPC deadline is the wait's timeout (DEADLINE_EXCEEDED).
      rpc Wait(WaitRequest) returns (WaitResponse);
      // Add ``delta`` to the decimal integer stored at ``key`` (a missing key is 0).
      rpc Add(AddRequest) returns (AddResponse);
    }

    message WaitRequest {
      uint32 mode = 1;       // MODE_KEY: `key` exists; MODE_VALUE: `key` holds `value`;
                             // MODE_KEYS: `count` keys in [key, range_end) match `pattern`
                             // (and hold `value` when has_value)
      bytes key = 2;         // the full key (MODE_KEY/VALUE) or the start of the range
      bytes range_end = 3;   // MODE_KEYS: the end of the range (etcd's rules); else empty
      bytes pattern = 4;     // MODE_KEYS: full-key pattern; '*' matches any bytes ('/' too);
                             // it must start with `key`
      uint32 count = 5;      // MODE_KEYS: how many matching keys end the wait (>= 1)
      bytes value = 6;       // the value filter
      bool has_value = 7;    // MODE_VALUE: must be true; MODE_KEYS: optional
      bool count_only = 8;   // MODE_KEYS: answer with `count` and `revision` only
    }
    message WaitResponse {
      repeated bytes keys = 1;    // the matched keys (full keys), sorted
      repeated bytes values = 2;  // their values, parallel to `keys`; left out when the
                                  // request had a value filter (every value equals it)
      int64 revision = 3;         // the etcd revision of the state the answer comes from
      uint32 count = 4;           // how many keys matched
    }
    message AddRequest  { bytes key = 1; sint64 delta = 2; }
    message AddResponse { sint64 value = 1; int64 revision = 2; }

The answer to a wait is never older than the call: the gateway evaluates it on a state
at least as new as etcd's revision when the call arrived. Errors use etcd's codes and
messages (``PERMISSION_DENIED`` "etcdserver: permission denied" for a range outside the
caller's prefix); ``INVALID_ARGUMENT`` with an ``etha gateway:`` message for a malformed
request; ``FAILED_PRECONDITION`` when ``Add`` finds a value that is not a decimal
integer; ``DEADLINE_EXCEEDED`` at the wait's deadline (its message says what was seen
when the gateway answers it just before the deadline).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "etha.gateway.v1.Coordination"
WAIT_METHOD = f"/{SERVICE}/Wait"
ADD_METHOD = f"/{SERVICE}/Add"

MODE_KEY = 1
MODE_VALUE = 2
MODE_KEYS = 3
MODES = (MODE_KEY, MODE_VALUE, MODE_KEYS)

_F = descriptor_pb2.FieldDescriptorProto
_FIELDS: dict[str, list[tuple[str, int, int, int]]] = {
    # name, number, type, label
    "WaitRequest": [
        ("mode", 1, _F.TYPE_UINT32, _F.LABEL_OPTIONAL),
        ("key", 2, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
        ("range_end", 3, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
        ("pattern", 4, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
        ("count", 5, _F.TYPE_UINT32, _F.LABEL_OPTIONAL),
        ("value", 6, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
        ("has_value", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL),
        ("count_only", 8, _F.TYPE_BOOL, _F.LABEL_OPTIONAL),
    ],
    "WaitResponse": [
        ("keys", 1, _F.TYPE_BYTES, _F.LABEL_REPEATED),
        ("values", 2, _F.TYPE_BYTES, _F.LABEL_REPEATED),
        ("revision", 3, _F.TYPE_INT64, _F.LABEL_OPTIONAL),
        ("count", 4, _F.TYPE_UINT32, _F.LABEL_OPTIONAL),
    ],
    "AddRequest": [
        ("key", 1, _F.TYPE_BYTES, _F.LABEL_OPTIONAL),
        ("delta", 2, _F.TYPE_SINT64, _F.LABEL_OPTIONAL),
    ],
    "AddResponse": [
        ("value", 1, _F.TYPE_SINT64, _F.LABEL_OPTIONAL),
        ("revision", 2, _F.TYPE_INT64, _F.LABEL_OPTIONAL),
    ],
}


def _build() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="etha/gateway/v1/coordination.proto", package="etha.gateway.v1", syntax="proto3"
    )
    for message, fields in _FIELDS.items():
        desc = proto.message_type.add(name=message)
        for name, number, type_, label in fields:
            desc.field.add(name=name, number=number, type=type_, label=label, json_name=name)
    service = proto.service.add(name="Coordination")
    service.method.add(
        name="Wait", input_type=".etha.gateway.v1.WaitRequest",
        output_type=".etha.gateway.v1.WaitResponse",
    )  # fmt: skip
    service.method.add(
        name="Add", input_type=".etha.gateway.v1.AddRequest",
        output_type=".etha.gateway.v1.AddResponse",
    )  # fmt: skip
    # A private pool: the default one may already hold a file of this name (reloads).
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"etha.gateway.v1.{name}"))
        for name in _FIELDS
    }


_CLASSES = _build()
#: The message classes (protobuf messages; see the module docstring for the fields).
WaitRequest: Any = _CLASSES["WaitRequest"]
WaitResponse: Any = _CLASSES["WaitResponse"]
AddRequest: Any = _CLASSES["AddRequest"]
AddResponse: Any = _CLASSES["AddResponse"]


def wait_stub(channel: Any) -> Any:
    """The client callable of ``Coordination.Wait`` on a ``grpc.Channel`` or aio channel."""
    return channel.unary_unary(
        WAIT_METHOD,
        request_serializer=WaitRequest.SerializeToString,
        response_deserializer=WaitResponse.FromString,
    )


def add_stub(channel: Any) -> Any:
    """The client callable of ``Coordination.Add`` on a ``grpc.Channel`` or aio channel."""
    return channel.unary_unary(
        ADD_METHOD,
        request_serializer=AddRequest.SerializeToString,
        response_deserializer=AddResponse.FromString,
    )


def pattern_matcher(pattern: bytes) -> Any:
    """A predicate ``key -> bool``: does the full key match ``pattern`` (``*`` = any bytes)?

    One ``*`` (the barrier shape, ``.../rank:*/ready``) is a prefix and suffix test on
    the raw bytes; no ``*`` is equality; more use a compiled regex.
    """
    import re

    parts = pattern.split(b"*")
    if len(parts) == 1:
        return pattern.__eq__
    if len(parts) == 2:
        head, tail = parts
        shortest = len(head) + len(tail)

        def one_star(key: bytes) -> bool:
            return len(key) >= shortest and key.startswith(head) and key.endswith(tail)

        return one_star
    regex = re.compile(b".*".join(re.escape(p) for p in parts), re.DOTALL)
    return lambda key: regex.fullmatch(key) is not None


__all__ = [
    "ADD_METHOD",
    "MODES",
    "MODE_KEY",
    "MODE_KEYS",
    "MODE_VALUE",
    "SERVICE",
    "WAIT_METHOD",
    "AddRequest",
    "AddResponse",
    "WaitRequest",
    "WaitResponse",
    "add_stub",
    "pattern_matcher",
    "wait_stub",
]

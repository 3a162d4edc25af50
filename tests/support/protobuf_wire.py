"""Raw protobuf wire encoding, for requests the generated classes cannot express.

Hostile-input tests hand-craft fields that the gateway's descriptors do not know (or
that a class would refuse), independently of the product's own encoder.
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """``value`` (non-negative) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError(f"varint takes a non-negative value, not {value}")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

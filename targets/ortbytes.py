"""Canonical bytes for an ORT-format (.ort) file: the kernel type-string table in sorted order.

onnxruntime's converter writes the session's KernelTypeStrResolver from hash maps whose seed follows the converting
process's memory layout (what it imported, the interpreter's path), so the same model converts to different bytes in
different processes and install paths. Only that table moves: ORT writes (flatbuffers build back to front) the
version string, then the Model subtree, then the resolver subtree, then the root InferenceSession table, so a file
is ``[root offset, "ORTM"][root table + resolver][Model subtree][version string]``. ``canonical_ort`` keeps the
tail (the Model subtree and the version string) byte for byte at the same distance from the end (flatbuffers offsets
are relative and its alignment counts from the buffer's end, so the tail stays valid) and writes a new front: the
resolver's entries sorted by op id, each entry's type strings sorted, with vtables of its own, then the root table.

Read with the flatbuffers runtime and ORT's schema slots (onnxruntime/core/flatbuffers/schema/ort.fbs, the
generated readers in onnxruntime/tools/ort_format_model/ort_flatbuffers_py/fbs/), not ``onnxruntime.tools``
(which imports torch). A file not laid out that way (another ORT version, a field this module does not know, not an
ORT file) comes back unchanged, with a warning.
"""

from __future__ import annotations

import logging
import struct

import flatbuffers
from flatbuffers import number_types as N
from flatbuffers.table import Table

logger = logging.getLogger(__name__)

IDENTIFIER = b"ORTM"
# Every scalar in ORT's schema is at most 8 bytes wide and the converter's files are multiples of 8 long: a new
# front padded to a multiple of 8 keeps each tail byte's address mod 8, so what was aligned stays aligned.
ALIGN = 8
# Vtable slots (ort.fbs). InferenceSession: ort_version 0, model 1, session_state 2 (deprecated), resolver 3.
SESSION_VERSION, SESSION_MODEL, SESSION_DEPRECATED_STATE, SESSION_RESOLVER = 0, 1, 2, 3
FIELDS = {"session": 4, "resolver": 1, "op_entry": 2, "kts_entry": 2, "arg": 2, "model": None}  # None: not checked

# (arg_type, index) of one ArgTypeAndIndex; (kernel type string, args); (op id, kernel type string entries)
Arg = tuple[int, int]
KtsEntry = tuple[bytes, tuple[Arg, ...]]
OpEntry = tuple[bytes, tuple[KtsEntry, ...]]


class Unexpected(ValueError):
    """The buffer is not an ORT file laid out as this module expects."""


def canonical_ort(data: bytes) -> bytes:
    """``data`` with its kernel type-string table re-written in sorted order; unchanged (and logged) if unexpected."""
    try:
        session = _parse(data)
        out = _build(data, session)
        again = _parse(out)
        same = all(again[k] == session[k] for k in ("entries", "model_end", "version_end"))
        if not same or memoryview(out)[again["low"]:] != memoryview(data)[session["low"]:]:
            raise Unexpected("the re-written file does not read back the same")
    except Exception as e:  # whatever the bytes hold, a build publishes the converter's file rather than fail here
        logger.warning("ORT file left as converted (its bytes may differ between converting processes): %s", e)
        return data
    return out


def _table(buf: bytes, pos: int, kind: str) -> Table:
    """The table at ``pos``, checked to lie in the buffer and to set no field past the schema's ``FIELDS[kind]``."""
    if not 0 <= pos <= len(buf) - 4:
        raise Unexpected(f"{kind} table out of the buffer")
    t = Table(buf, pos)
    vt = pos - t.Get(N.SOffsetTFlags, pos)
    if not 0 <= vt <= len(buf) - 4:
        raise Unexpected(f"{kind} vtable out of the buffer")
    size = t.Get(N.VOffsetTFlags, vt)
    if size < 4 or size % 2 or vt + size > len(buf):
        raise Unexpected(f"{kind} vtable malformed")
    for slot in range(FIELDS[kind] or (size - 4) // 2, (size - 4) // 2):
        if t.Offset(4 + 2 * slot):
            raise Unexpected(f"{kind} has field {slot}, which this module does not know (another ORT version?)")
    return t


def _vtable(t: Table) -> int:
    return t.Pos - t.Get(N.SOffsetTFlags, t.Pos)


def _field(t: Table, slot: int) -> int:
    return t.Offset(4 + 2 * slot)


def _string(t: Table, slot: int, what: str) -> bytes:
    o = _field(t, slot)
    if not o:
        raise Unexpected(f"{what} missing")
    return bytes(t.String(o + t.Pos))


def _tables(buf: bytes, t: Table, slot: int, kind: str) -> list[Table]:
    """The tables of a vector-of-tables field (an absent vector reads as empty)."""
    o = _field(t, slot)
    if not o:
        return []
    start, n = t.Vector(o), t.VectorLen(o)
    if start + 4 * n > len(buf):
        raise Unexpected(f"{kind} vector out of the buffer")
    return [_table(buf, t.Indirect(start + 4 * j), kind) for j in range(n)]


def _parse(data: bytes) -> dict:
    if len(data) < 16 or data[4:8] != IDENTIFIER:
        raise Unexpected("not an ORT format file (no ORTM identifier)")
    if len(data) % ALIGN:
        raise Unexpected(f"length {len(data)} is not a multiple of {ALIGN}")
    buf = bytes(data)
    root = _table(buf, struct.unpack_from("<I", buf, 0)[0], "session")
    if _field(root, SESSION_DEPRECATED_STATE):
        raise Unexpected("has a (deprecated) session state")
    o_version, o_model, o_resolver = (_field(root, s) for s in (SESSION_VERSION, SESSION_MODEL, SESSION_RESOLVER))
    if not (o_version and o_model and o_resolver):
        raise Unexpected("the root table lacks its version, model or kernel type-string resolver")
    version = root.Pos + o_version + root.Get(N.UOffsetTFlags, root.Pos + o_version)
    model = _table(buf, root.Indirect(root.Pos + o_model), "model")  # only its position and vtable matter
    resolver = _table(buf, root.Indirect(root.Pos + o_resolver), "resolver")
    # The Model subtree's lowest byte: the Model table, or its vtable when ORT wrote one just before it.
    low = min(model.Pos, _vtable(model))
    if not (root.Pos < low and resolver.Pos < low and version > low):
        raise Unexpected("not laid out as [root + resolver][Model][version]")
    entries: list[OpEntry] = []
    for op in _tables(buf, resolver, 0, "op_entry"):
        if op.Pos >= low:
            raise Unexpected("a resolver entry lies inside the Model subtree")
        kts_entries: list[KtsEntry] = []
        for kts in _tables(buf, op, 1, "kts_entry"):
            args = tuple((a.Get(N.Int8Flags, a.Pos + o0) if (o0 := _field(a, 0)) else 0,
                          a.Get(N.Uint32Flags, a.Pos + o1) if (o1 := _field(a, 1)) else 0)
                         for a in _tables(buf, kts, 1, "arg"))
            kts_entries.append((_string(kts, 0, "kernel type string"), args))
        entries.append((_string(op, 0, "op id"), tuple(sorted(kts_entries))))
    return {"entries": sorted(entries), "low": low, "model_end": len(buf) - model.Pos, "version_end": len(buf) - version}


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _build(data: bytes, session: dict) -> bytes:
    """A buffer holding ``data``'s tail as is, before it the sorted resolver and a root table that points at both."""
    b = flatbuffers.Builder(0)
    b.Bytes, b.head = bytearray(data[session["low"]:]), 0  # builder offsets count from the end: the tail's stay valid
    b.minalign = ALIGN
    ops = []
    for op_id, kts_entries in session["entries"]:
        kts_offsets = []
        for kts, args in kts_entries:
            arg_offsets = []
            for arg_type, index in args:
                b.StartObject(FIELDS["arg"])
                b.PrependInt8Slot(0, arg_type, 0)
                b.PrependUint32Slot(1, index, 0)
                arg_offsets.append(b.EndObject())
            args_vector, name = _vector(b, arg_offsets), b.CreateString(kts)
            b.StartObject(FIELDS["kts_entry"])
            b.PrependUOffsetTRelativeSlot(0, name, 0)
            b.PrependUOffsetTRelativeSlot(1, args_vector, 0)
            kts_offsets.append(b.EndObject())
        kts_vector, name = _vector(b, kts_offsets), b.CreateString(op_id)
        b.StartObject(FIELDS["op_entry"])
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        b.PrependUOffsetTRelativeSlot(1, kts_vector, 0)
        ops.append(b.EndObject())
    ops_vector = _vector(b, ops)
    b.StartObject(FIELDS["resolver"])
    b.PrependUOffsetTRelativeSlot(0, ops_vector, 0)
    resolver = b.EndObject()
    b.StartObject(FIELDS["session"])
    b.PrependUOffsetTRelativeSlot(SESSION_VERSION, session["version_end"], 0)
    b.PrependUOffsetTRelativeSlot(SESSION_MODEL, session["model_end"], 0)
    b.PrependUOffsetTRelativeSlot(SESSION_RESOLVER, resolver, 0)
    b.Finish(b.EndObject(), file_identifier=IDENTIFIER)
    return bytes(b.Output())

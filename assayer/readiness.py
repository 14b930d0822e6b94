"""Is a checkpoint completely written? Format-aware where the format says, a settle window otherwise.

``torch.save`` writes in place, so a checkpoint exists long before it is complete. A torch zip
archive is complete once its end-of-central-directory record is there and consistent; a
safetensors file once its size matches its header. Any other file must stay unchanged (size and
mtime) for ``settle`` seconds.

NFS caveat: clients cache file attributes (``actimeo``, 3-60 s by default), so size and mtime
seen through NFS can lag the writer. Format checks read the file's bytes and are reliable;
for other formats raise ``--settle`` above the mount's attribute cache time.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import BinaryIO

ZIP_LOCAL = b"PK\x03\x04"
ZIP_CENTRAL = b"PK\x01\x02"
ZIP_EOCD = b"PK\x05\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
ZIP64_EOCD = b"PK\x06\x06"
EOCD_SIZE = 22
MAX_COMMENT = 0xFFFF
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


class Format(enum.Enum):
    COMPLETE = "complete"  # the format proves the file is whole
    INCOMPLETE = "incomplete"  # the format proves it is not (yet)
    UNKNOWN = "unknown"  # the format says nothing: use the settle window


def check_format(path: str, size: int) -> Format:
    """Read just enough of ``path`` to tell whether its format says it is complete."""
    if size < 8:
        return Format.INCOMPLETE if size < 4 else Format.UNKNOWN
    with open(path, "rb") as fh:
        head = fh.read(9)
        if head[:4] == ZIP_LOCAL:
            return _zip_state(fh, size)
        if len(head) >= 9 and head[8:9] == b"{":
            (header_len,) = struct.unpack("<Q", head[:8])
            if 0 < header_len < SAFETENSORS_MAX_HEADER:
                return _safetensors_state(fh, size, header_len)
    return Format.UNKNOWN


def _zip_state(fh: BinaryIO, size: int) -> Format:
    tail_len = min(size, EOCD_SIZE + MAX_COMMENT)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    pos = tail.rfind(ZIP_EOCD)
    while pos >= 0:
        record = tail[pos : pos + EOCD_SIZE]
        if len(record) == EOCD_SIZE:
            _, _, _, _, entries, cd_size, cd_offset, comment_len = struct.unpack("<4sHHHHIIH", record)
            eocd_at = size - tail_len + pos
            if eocd_at + EOCD_SIZE + comment_len == size:
                return _zip_directory_state(fh, eocd_at, entries, cd_size, cd_offset)
        pos = tail.rfind(ZIP_EOCD, 0, pos)
    return Format.INCOMPLETE


def _zip_directory_state(fh: BinaryIO, eocd_at: int, entries: int, cd_size: int, cd_offset: int) -> Format:
    directory_end = eocd_at
    locator = b""
    if eocd_at >= 20:
        fh.seek(eocd_at - 20)
        locator = fh.read(20)
    # torch always writes the zip64 records; other writers only when a field overflows
    if locator[:4] == ZIP64_LOCATOR:
        (record_at,) = struct.unpack("<Q", locator[8:16])
        fh.seek(record_at)
        record = fh.read(56)
        if len(record) < 56 or record[:4] != ZIP64_EOCD or record_at + 56 > eocd_at - 20:
            return Format.INCOMPLETE
        cd_size, cd_offset = struct.unpack("<QQ", record[40:56])
        directory_end = record_at
    elif 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        return Format.INCOMPLETE
    if cd_offset + cd_size != directory_end:
        return Format.INCOMPLETE
    if cd_size:
        fh.seek(cd_offset)
        if fh.read(4) != ZIP_CENTRAL:
            return Format.INCOMPLETE
    return Format.COMPLETE


def _safetensors_state(fh: BinaryIO, size: int, header_len: int) -> Format:
    if size < 8 + header_len:
        return Format.INCOMPLETE
    fh.seek(8)
    try:
        header = json.loads(fh.read(header_len))
    except (ValueError, UnicodeDecodeError):
        return Format.UNKNOWN
    if not isinstance(header, dict):
        return Format.UNKNOWN
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            return Format.UNKNOWN
    expected = 8 + header_len + data_end
    if size < expected:
        return Format.INCOMPLETE
    return Format.COMPLETE if size == expected else Format.UNKNOWN


def settled_at(mtime: float, first_seen: float, settle: float) -> float:
    """When a file of unknown format counts as complete.

    The file must have been unchanged for ``settle`` seconds. Its mtime says since when, unless
    the mtime lies in the future (clock skew on a network mount): then we count from when we
    first saw this size and mtime.
    """
    return min(mtime, first_seen) + settle

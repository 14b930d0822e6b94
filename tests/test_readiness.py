"""Completeness checks on real files, cut at every interesting point."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from writers import safetensors_bytes, torch_bytes, zip_bytes

from assayer.readiness import Format, check_format, settled_at


def state(path: Path) -> Format:
    return check_format(str(path), path.stat().st_size)


@pytest.mark.parametrize("make", [torch_bytes, zip_bytes], ids=["torch-zip", "plain-zip"])
def test_zip_is_complete_only_once_its_central_directory_is_written(tmp_path: Path, make: Callable[[int], bytes]) -> None:
    data = make(1)
    path = tmp_path / "model.pt"
    cuts = sorted({1, 4, 8, len(data) // 3, len(data) // 2, len(data) - 23, len(data) - 22, len(data) - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert state(path) is not Format.COMPLETE, f"prefix of {cut}/{len(data)} bytes taken as complete"
    path.write_bytes(data)
    assert state(path) is Format.COMPLETE


def test_zip_with_trailing_garbage_or_torn_directory_is_not_complete(tmp_path: Path) -> None:
    data = torch_bytes(2)
    path = tmp_path / "model.pt"
    path.write_bytes(data + b"\0" * 10)
    assert state(path) is Format.INCOMPLETE
    eocd = data.rfind(b"PK\x05\x06")
    broken = bytearray(data)
    broken[eocd - 56 - 20 : eocd - 56 - 20 + 4] = b"XXXX"  # zip64 end record signature overwritten
    path.write_bytes(bytes(broken))
    assert state(path) is Format.INCOMPLETE


def test_zip_comment_is_allowed(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "a.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x", b"123")
        zf.comment = b"trained by me"
    assert state(path) is Format.COMPLETE


def test_safetensors_complete_when_size_matches_header(tmp_path: Path) -> None:
    data = safetensors_bytes(3)
    path = tmp_path / "model.safetensors"
    (header_len,) = struct.unpack("<Q", data[:8])
    for cut in (9, 8 + header_len // 2, 8 + header_len, len(data) - 1):
        path.write_bytes(data[:cut])
        assert state(path) is Format.INCOMPLETE, cut
    path.write_bytes(data)
    assert state(path) is Format.COMPLETE
    path.write_bytes(data + b"extra")
    assert state(path) is Format.UNKNOWN  # not what the header says: fall back to the settle window


def test_other_formats_say_nothing(tmp_path: Path) -> None:
    path = tmp_path / "model.state"
    path.write_bytes(b"\x80\x04legacy pickle checkpoint")
    assert state(path) is Format.UNKNOWN
    path.write_bytes(b"ab")
    assert state(path) is Format.INCOMPLETE  # too short to tell anything yet


def test_settle_window_counts_from_mtime_or_first_sight_whichever_is_earlier() -> None:
    assert settled_at(mtime=100.0, first_seen=150.0, settle=2) == 102.0  # written long ago: ready at once
    assert settled_at(mtime=500.0, first_seen=150.0, settle=2) == 152.0  # mtime in the future (clock skew)

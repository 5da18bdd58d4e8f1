"""Reading a crawl file's WARC records: fastwarc while it can, a resynchronising gzip reader
past damage, every byte hashed once for lineage."""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections import deque
from collections.abc import Iterator
from typing import Any, BinaryIO

from isal import isal_zlib

from pipelines.common import InputError, KilnError
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.inputs import remote_error
from pipelines.ingest.records import document_row, reraise_if_fatal

log = logging.getLogger("kiln.ingest")

GZIP_MAGIC = b"\x1f\x8b\x08"
READ_CHUNK = 1 << 20
RAW_WINDOW = 8 << 20        # raw bytes kept to go back to the last good record when fastwarc fails
RESYNC_WINDOW = 1 << 20     # raw bytes of a member kept to look for the next member in if it breaks


class RawReader:
    """The crawl file's bytes, read once, front to back, hashed and counted on the way.

    The last RAW_WINDOW bytes are kept, so a reader can `rewind` a little (to the last good
    record, after fastwarc stumbles) without reading or hashing anything twice.
    """

    def __init__(self, handle: BinaryIO, source: str):
        self.handle, self.source = handle, source
        self.sha256 = hashlib.sha256()
        self.bytes = 0                   # read from the file (and hashed)
        self.position = 0                # handed out; below `bytes` while replaying
        self._window = bytearray()       # raw bytes from _window_start to `bytes`
        self._window_start = 0
        self._replay = b""

    def read(self, size: int = READ_CHUNK) -> bytes:
        if size is None or size < 0:
            size = READ_CHUNK
        if self._replay:
            data, self._replay = self._replay[:size], self._replay[size:]
            self.position += len(data)
            return data
        try:
            data = self.handle.read(size)
        except KilnError:
            raise
        except Exception as err:
            if "://" not in self.source and isinstance(err, OSError):
                raise InputError(f"{self.source}: read error ({err})") from None
            raise remote_error(self.source, err, reading=True) from None
        self.sha256.update(data)
        self.bytes += len(data)
        self.position += len(data)
        self._window += data
        if len(self._window) > 2 * RAW_WINDOW:
            cut = len(self._window) - RAW_WINDOW
            del self._window[:cut]
            self._window_start += cut
        return data

    def tell(self) -> int:
        return self.position

    def rewind(self, offset: int) -> bool:
        """Serve the bytes from `offset` again; False when they are no longer kept."""
        if not self._window_start <= offset <= self.bytes:
            return False
        self._replay = bytes(self._window[offset - self._window_start:])
        self.position = offset
        return True

    def drain(self) -> None:
        """Hash what the parser did not need (trailing bytes after the last record)."""
        self._replay = b""
        while self.read():
            pass


def check_is_warc(raw: RawReader, source: str) -> bool:
    """Whether the file is gzipped; InputError when it is no WARC file at all."""
    head = raw.read(1 << 16)
    raw.rewind(0)
    if head[:3] == GZIP_MAGIC:
        try:
            inner = zlib.decompressobj(31).decompress(head, 64)
        except zlib.error:
            inner = b""
        if inner.lstrip()[:5] != b"WARC/":
            raise InputError(f"{source}: not a WARC file (gzip, but what it holds is not WARC)")
        return True
    if head[:64].lstrip()[:5] == b"WARC/":
        return False
    kinds = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
             (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
             (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ", "xz-compressed"), (b"filedesc://", "an ARC file")]
    what = next((name for magic, name in kinds if head.startswith(magic)), None)
    if what is None:
        what = "an empty file" if not head else f"starts with {head[:24]!r}"
    raise InputError(f"{source}: not a WARC file ({what})")


# ============================================================== the decompressed stream


class WarcStream:
    """The WARC bytes of a crawl file, from where the raw reader is, as a file-like object for
    fastwarc (read, tell), in segments: fastwarc reads one segment at a time. Inflating is
    ISA-L's (isal_zlib, zlib's interface, 1.3x zlib's speed here).

    Gzip files are inflated member by member, and every member is a segment: a record ends
    with its member, as the WARC standard writes them, so a record that claims more bytes than
    its member holds comes out short instead of swallowing the records after it (fastwarc's own
    gzip reader, like any reader of the inflated stream, reads on into them). Bytes that are not
    a gzip member are skipped up to the next member (`resyncs`). A member that breaks
    (truncated, corrupt) ends its segment where it breaks, and `next_segment()` moves on to the
    next member found after the broken one's start. Plain files are one segment, read on after
    a failure from where the parser stopped.
    """

    def __init__(self, raw: RawReader, gzipped: bool):
        self.raw, self.gzip = raw, gzipped
        self.resyncs = 0
        self._skip_member = False               # inflate it to find its end, but its record is done
        self._pending_raw = raw.tell()          # raw offset of _pending[0]
        self._pending = raw.read(READ_CHUNK)    # raw bytes not yet inflated, from _pending_off on
        self._pending_off = 0
        self._raw_eof = not self._pending
        self._buf, self._buf_off = b"", 0       # WARC bytes not yet read
        self._pos = 0                           # WARC bytes handed out (tell)
        self._produced = 0                      # WARC bytes made so far
        self._segment_end = False
        self._inflater: isal_zlib.Decompress | None = None
        self._feed = 4 << 10                    # raw bytes given to the inflater at a time
        self._tail = b""                        # input the inflater has not consumed yet
        self._member_raw = bytearray()          # the current member's raw bytes (its last RESYNC_WINDOW)
        self._member_out = 0                    # bytes it has inflated to
        self._member_from_start = True
        self._resync_from: bytes | None = None  # set when a member broke
        self.members: deque[tuple[int, int]] = deque([(0, self._pending_raw)])  # (WARC, raw) offsets

    # -------------------------------------------------------- file protocol for fastwarc

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (fewer before a piece boundary); b"" at the end of the segment."""
        while self._buf_off >= len(self._buf):
            if self._segment_end:
                return b""
            self._buf, self._buf_off = self._produce(), 0
        if size is None or size < 0:
            size = len(self._buf)
        data = self._buf[self._buf_off:self._buf_off + size]
        self._buf_off += len(data)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    # -------------------------------------------------------- segments

    def next_segment(self) -> bool:
        """After a break: go on at the next gzip member (dropping what the reader left of the
        broken one); plain files go on where they are. False at the end."""
        if self.gzip:
            self._buf, self._buf_off = b"", 0
        if self._resync_from is not None:
            # the next member may start inside the bytes the broken inflater swallowed
            self._pending = self._resync_from + self._pending[self._pending_off:]
            self._pending_raw = self._raw_offset() - len(self._resync_from)
            self._pending_off = 0
            self._resync_from = None
        self._segment_end = False
        return not (self._raw_eof and self._pending_off >= len(self._pending) and not self._tail)

    def abandon_member(self) -> None:
        """The parser failed: skip the rest of the current gzip member (plain: carry on)."""
        if self.gzip and self._inflater is not None:
            self._break_member(salvage=False)
        self._segment_end = True

    def raw_offset_of(self, position: int) -> int:
        """The raw offset of the gzip member holding WARC offset `position` (itself when plain)."""
        if not self.gzip:
            return position
        while len(self.members) > 1 and self.members[1][0] <= position:
            self.members.popleft()
        return self.members[0][1]

    # -------------------------------------------------------- internals

    def _raw_offset(self) -> int:
        return self._pending_raw + self._pending_off

    def _fill_pending(self, at_least: int) -> None:
        while len(self._pending) - self._pending_off < at_least and not self._raw_eof:
            more = self.raw.read(READ_CHUNK)
            if not more:
                self._raw_eof = True
                break
            self._pending_raw += self._pending_off
            self._pending, self._pending_off = self._pending[self._pending_off:] + more, 0

    def _take_raw(self, size: int) -> bytes:
        """The next raw bytes; always a slice of _pending that ends at _pending_off."""
        if self._pending_off >= len(self._pending):
            self._fill_pending(1)
        data = self._pending[self._pending_off:self._pending_off + size]
        self._pending_off += len(data)
        return data

    def _produce(self) -> bytes:
        """The next piece of WARC bytes; b"" (and _segment_end) at a break or at the end."""
        if not self.gzip:
            data = self._take_raw(READ_CHUNK)
            if not data:
                self._segment_end = True
            self._produced += len(data)
            return data
        if self._inflater is None and not self._start_member():
            self._segment_end = True
            return b""
        assert self._inflater is not None  # _start_member made one
        # Small bites for small members (most hold one record of a few KB: what is left over is
        # copied back), growing for big ones.
        data = self._tail or self._take_raw(self._feed)
        if not data:  # the file ends inside this member
            return self._break_member()
        if not self._tail:
            self._remember(data)
            self._feed = min(self._feed * 2, 256 << 10)
        try:
            out = self._inflater.decompress(data, READ_CHUNK)
        except (zlib.error, isal_zlib.error):  # type: ignore[misc] # isal's stub: `error: Exception`, an instance
            return self._break_member()
        if self._inflater.eof:
            # unused_data is a suffix of the slice taken from _pending: give it back
            self._pending_off -= len(self._inflater.unused_data)
            self._inflater, self._tail, self._member_raw = None, b"", bytearray()
            self._segment_end = True  # the member's record ends here, whatever it claimed
            if self._skip_member:
                self._skip_member = False
                return b""
        else:
            self._tail = self._inflater.unconsumed_tail
        if self._skip_member:
            return b""
        self._produced += len(out)
        self._member_out += len(out)
        return out

    def _remember(self, data: bytes) -> None:
        self._member_raw += data
        if len(self._member_raw) > 2 * RESYNC_WINDOW:
            del self._member_raw[: len(self._member_raw) - RESYNC_WINDOW]
            self._member_from_start = False

    def _break_member(self, salvage: bool = True) -> bytes:
        """End the segment at a damaged member; returns what it held before the damage."""
        rest = self._salvage() if salvage and not self._skip_member else b""
        self._skip_member = False
        self._resync_from = bytes(self._member_raw[1:] if self._member_from_start else self._member_raw)
        self._inflater, self._tail, self._member_raw = None, b"", bytearray()
        self._segment_end = True
        self._produced += len(rest)
        return rest

    def _salvage(self) -> bytes:
        """Inflate the broken member again in small steps: a zlib error loses the output of the
        call that hit it, and without that output the damaged record would vanish uncounted."""
        if not self._member_from_start:
            return b""
        inflater, pieces, raw = zlib.decompressobj(31), [], bytes(self._member_raw)
        for start in range(0, len(raw), 512):
            try:
                pieces.append(inflater.decompress(raw[start:start + 512]))
            except zlib.error:
                break
            if inflater.eof:
                break
        return b"".join(pieces)[self._member_out:]

    def _start_member(self) -> bool:
        """Move to the next gzip member, skipping anything else; False at the end of the file."""
        skipped = False
        while True:
            self._fill_pending(10)
            if self._pending_off >= len(self._pending):
                self.resyncs += skipped
                return False
            at = self._pending.find(GZIP_MAGIC, self._pending_off)
            flags = self._pending[at + 3:at + 4]
            if at == self._pending_off and (not flags or flags[0] < 0x20):
                break  # a gzip header: magic, deflate, no reserved flag bits
            skipped = True
            if at < 0:  # keep 2 bytes: a magic may straddle the end of the chunk
                self._pending_off = (len(self._pending) if self._raw_eof
                                     else max(self._pending_off, len(self._pending) - 2))
            else:
                self._pending_off = at if at > self._pending_off else at + 1
        self.resyncs += skipped
        self._skip_member = self._skip_member and not skipped  # not at the member we were to skip
        self._inflater, self._feed, self._member_out = isal_zlib.decompressobj(31), 4 << 10, 0
        self._member_raw, self._member_from_start = bytearray(), True
        self.members.append((self._produced, self._raw_offset()))
        return True


# ============================================================== records -> documents


def read_documents(raw: RawReader, source: str, config: IngestConfig,
                   counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Rows for the HTML pages (and WET texts) of one crawl file; counts what it skips, by reason.

    Every record read is counted once, as a document or under a skip reason (`records =
    documents + skipped_*`); what cannot be read as a record (a damaged member, garbage where a
    record header should be) counts as one `damaged` record. Gzip files are read member by
    member (`WarcStream`). Plain files: fastwarc reads the file itself until it fails on damage;
    from just past the last good record, `WarcStream` takes over.
    """
    from fastwarc.warc import ArchiveIterator

    gzipped = check_is_warc(raw, source)
    state: dict[str, Any] = {"last": None}
    if not gzipped:
        records = ArchiveIterator(raw, parse_http=True, quirks_mode=True, auto_decode="none",  # type: ignore[arg-type]
                                  stream_detect=False)  # fastwarc reads with read() and tell() only; its stub asks more
        error = yield from _rows(iter(records), lambda position: position, source, config, counts, state)
        if error is None:
            return
        _count_damaged(counts, source, error, raw.tell())
        last = state["last"]  # on just past that record's start: fastwarc finds the next `WARC/` line
        if not raw.rewind(0 if last is None else last + 1):
            counts["parse_errors"] += 1  # too far back to go there: what lies between is lost
    stream = WarcStream(raw, gzipped)
    try:
        while True:
            started_at = stream.tell()
            records = ArchiveIterator(stream, parse_http=True, quirks_mode=True, auto_decode="none",  # type: ignore[arg-type]
                                      stream_detect=False)  # as above: read() and tell() are enough
            error = yield from _rows(iter(records), stream.raw_offset_of, source, config, counts, state)
            if error is not None:
                _count_damaged(counts, source, error, raw.tell())
                if not gzipped and stream.tell() == started_at:
                    return  # no progress: give up on the rest of this file
                stream.abandon_member()
            if not stream.next_segment():
                return
    finally:
        counts["resyncs"] += stream.resyncs


def _count_damaged(counts: dict[str, int], source: str, error: BaseException, where: int) -> None:
    counts["records"] += 1
    counts["skipped_damaged"] += 1
    counts["parse_errors"] += 1
    log.warning("%s: WARC parse error near byte %d (%s); skipping ahead", source, where, _one_line(error))


def _rows(records: Iterator, offset_of, source: str, config: IngestConfig, counts: dict[str, int],
          state: dict[str, Any]):
    """Rows from a fastwarc iterator until it ends (returns None) or fails (returns the error)."""
    from fastwarc.warc import WarcRecordType

    kinds = {int(WarcRecordType.response): "response", int(WarcRecordType.conversion): "conversion"}
    while True:
        try:
            record = next(records)
        except StopIteration:
            return None
        except BaseException as err:  # fastwarc's Rust panics are BaseExceptions
            reraise_if_fatal(err)
            return err
        state["last"] = record.stream_pos
        counts["records"] += 1
        kind = kinds.get(int(record.record_type))
        if kind is None:
            counts["skipped_record_type"] += 1
            continue
        row = document_row(record, kind, source, offset_of(record.stream_pos), config, counts)
        if isinstance(row, str):
            counts[f"skipped_{row}"] += 1
        else:
            counts["documents"] += 1
            counts["document_bytes"] += row["payload_bytes"]
            yield row


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__

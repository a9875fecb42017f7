"""NBD wire format: constants, structs, and validation of requests at the edge.

Reference: the NBD protocol document (doc/proto.md of the NBD project).  Only what umbra serves is
here: fixed newstyle handshake, EXPORT_NAME / ABORT / LIST / INFO / GO / STRUCTURED_REPLY /
LIST_META_CONTEXT / SET_META_CONTEXT, simple and structured replies, ``base:allocation``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {
    0: "READ",
    1: "WRITE",
    2: "DISC",
    3: "FLUSH",
    4: "TRIM",
    5: "CACHE",
    6: "WRITE_ZEROES",
    7: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
ALLOWED_FLAGS = {
    CMD_READ: CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: 0,
    CMD_FLUSH: 0,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_CACHE: 0,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

# structured replies
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

# wire errors (the protocol's own numbering, equal to Linux errno values)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
WIRE_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 << 20  # largest READ/WRITE umbra accepts
MAX_DISCARDABLE = 64 << 20  # a larger WRITE payload cannot be skipped safely: the connection is closed

OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_REPLY = struct.Struct(">IHHQI")
MAX_OPTION_DATA = 64 * 1024


@dataclass
class Request:
    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @classmethod
    def parse(cls, raw: bytes) -> Request:
        return cls(*REQUEST.unpack(raw))


def validate(req: Request, size: int, read_only: bool, structured: bool) -> int | None:
    """The wire error for a request that must be refused, or None.  ``req.magic`` is checked by
    the caller (a bad magic means the stream is out of step and the connection is closed)."""
    if req.type not in ALLOWED_FLAGS:
        return EINVAL
    if req.flags & ~ALLOWED_FLAGS[req.type]:
        return EINVAL
    if req.type == CMD_READ and req.flags & CMD_FLAG_DF and not structured:
        return EINVAL
    if req.type == CMD_BLOCK_STATUS and not structured:
        return EINVAL
    if req.type in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and read_only:
        return EPERM
    if req.type in (CMD_READ, CMD_WRITE) and req.length > MAX_PAYLOAD:
        return EOVERFLOW if req.type == CMD_READ else EINVAL
    if req.type in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS):
        if req.length == 0 and req.type != CMD_BLOCK_STATUS:
            return EINVAL
        if req.offset + req.length > size:
            return ENOSPC if req.type in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if req.type in (CMD_FLUSH, CMD_DISC) and (req.offset or req.length):
        return EINVAL
    return None


def wire_error(exc: BaseException) -> int:
    """Map an exception from a handler to an NBD error number."""
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC:
        return ENOSPC
    if code == errno.EPERM or code == errno.EROFS:
        return EPERM
    if code in WIRE_ERRORS:
        return int(code)
    return EIO

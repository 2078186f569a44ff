"""Reading a configuration file that someone else controls without letting it stall the gateway.

A FIFO where a credentials file or a hosts.toml belongs blocks open() until a writer comes and read() until it
leaves; read on the event loop, that freezes every flow. A path must therefore be a regular file (symbolic links
followed) before it is opened, and it is opened without blocking and checked again on the descriptor, so that a
file swapped for a FIFO between the two checks cannot block either.
"""

import os
import stat
from pathlib import Path

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


# Configuration files (hosts.toml, credentials) are a few kilobytes; anything this large is read by mistake, and
# reading it would hold the event loop.
MAX_FILE_SIZE = 4 * 1024 * 1024


class NotRegularFileError(Exception):
    """The path is there but is not a regular file of a configuration file's size; str() says what it is."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"not a regular file but {kind}")


def check_regular(mode: int) -> None:
    """Raises NotRegularFileError unless `mode` (a stat's st_mode) is a regular file's."""
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(next((kind for is_kind, kind in _KINDS if is_kind(mode)), "a special file"))


def read_regular_file(path: Path) -> bytes:
    """The contents of `path`, which must be a regular file. Raises NotRegularFileError for anything else, and
    OSError (FileNotFoundError included) for a path that cannot be resolved or read."""
    # Checked before opening too: opening a device can have effects of its own.
    check_regular(os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        status = os.fstat(fd)
        check_regular(status.st_mode)
        if status.st_size > MAX_FILE_SIZE:
            raise NotRegularFileError(f"a file of {status.st_size} bytes (at most {MAX_FILE_SIZE} are read)")
        return file.read(MAX_FILE_SIZE + 1)[:MAX_FILE_SIZE]

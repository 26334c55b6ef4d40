"""Errors a user can act on. The CLI prints their message and exits with their ``exit_code``;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class PrefixgenError(Exception):
    """Base of every error with a message meant for the user (what is wrong, what to do)."""

    exit_code = 1


class ConfigError(PrefixgenError, ValueError):
    """A bad option, flag or config file value."""

    exit_code = 2


class DatasetError(PrefixgenError):
    """The dataset is missing, unreadable, or lacks the field asked for."""

    exit_code = 3


class ModelError(PrefixgenError):
    """The model cannot be loaded, is not a causal LM, or its cache is not a plain KV cache."""

    exit_code = 4


class StoreError(PrefixgenError):
    """The store cannot be opened or written as asked."""

    exit_code = 5


class CorruptStoreError(StoreError):
    """A store file is damaged: bad JSON, truncated file, checksum mismatch."""


class MissingShardError(CorruptStoreError):
    """A shard the index names is gone: the store changed under the reader (a prune, compaction or gc
    removed it after the index was read), or it was deleted by hand."""


class MissingStateError(CorruptStoreError):
    """A recurrent state file is gone: a gc or prune removed it (or moved it aside) after the reader
    looked, or it was deleted by hand. The block it follows is not at fault."""


class CorruptBlockError(CorruptStoreError):
    """One stored block fails its checksum. ``block`` is its position in the locations asked for,
    so a reader can still use the blocks before it."""

    def __init__(self, message: str, block: int):
        super().__init__(message)
        self.block = block


class NewerFormatError(StoreError):
    """The store was written by a newer prefixgen."""


class IncompatibleStoreError(StoreError):
    """The store was built for another model (or tokenizer, or block size)."""


class ExportError(PrefixgenError):
    """A store cannot be exported as asked: the target cannot represent it, or the output folder
    holds another export."""

    exit_code = 6


# The I/O errors a user acts on (free space, fix the disk), not bugs: one line each, whatever wrote.
_DISK_FULL = ("ENOSPC", "EDQUOT", "EFBIG")
_DISK_FAULT = ("EIO", "EROFS", "ENXIO", "ESTALE")


def io_error_message(exc: OSError) -> str | None:
    """The one-line message for an OSError a user acts on (a full disk, an I/O error), or None for
    any other (a bug, which keeps its traceback).

    Example:
        >>> import errno
        >>> io_error_message(OSError(errno.ENOSPC, "No space left on device", "store/x"))[:32]
        'the disk holding store/x is full'
    """
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    where = exc.filename or "the store"
    if name in _DISK_FULL:
        return (
            f"the disk holding {where} is full ({exc.strerror}): free some space, then rerun the same command "
            "(a build with --resume keeps everything written so far)"
        )
    if name in _DISK_FAULT:
        return (
            f"the disk failed while reading or writing {where} ({exc.strerror}): check the disk (dmesg), then rerun "
            "the same command (a build with --resume keeps everything written so far) and `prefixgen verify` the store"
        )
    return None

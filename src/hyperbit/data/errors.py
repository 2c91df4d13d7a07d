"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing path, an empty corpus, a malformed file, or shards that do not
    match their ``meta.json`` or tokenizer. The message is one readable line (a CLI prints it and
    exits with status 2); it always names the file, and the line or row where there is one."""

    @classmethod
    def from_os_error(cls, e: OSError) -> "DataError":
        """``cannot access PATH: reason`` for a file the user named that cannot be read."""
        where = f" {e.filename}" if e.filename else ""
        return cls(f"cannot access{where}: {e.strerror or e}")

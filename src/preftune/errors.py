"""The project's user-facing error types. The CLI prints these as one clear line (no traceback
unless --debug); everything else is a bug and keeps its traceback."""

from __future__ import annotations


class PreftuneError(Exception):
    """An error the user can act on: the message says what, where, and what to do."""


class DataError(PreftuneError):
    """Bad input data, naming the file, the row (1-based) and the field."""

    def __init__(self, message: str, file: str | None = None, row: int | None = None, field: str | None = None):
        self.message, self.file, self.row, self.field = message, file, row, field
        where = ", ".join(
            x for x in (file and f"{file}", row is not None and f"row {row}", field and f"field '{field}'") if x
        )
        super().__init__(f"{where}: {message}" if where else message)


class MissingExtraError(PreftuneError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(f"{what} needs '{package}', which is not installed: pip install 'preftune[{extra}]'")

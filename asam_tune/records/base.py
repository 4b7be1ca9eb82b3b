"""Frozen, versioned records and their strict, atomic file I/O (no torch import).

Every stage hands the next one a record (profile, plan, ...). Records are pydantic models that
reject unknown keys, NaN/inf and wrongly-typed values; loading turns pydantic's errors into one
``RecordError`` that names the file, the JSON path and expected versus actual.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, ValidationError, model_serializer

from asam_tune.errors import RecordError, UserInputError

R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """Base of every on-disk document: strict, frozen, no extra keys, finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    # Optional fields added to a schema after files were written: left out of the document while
    # None, so those files are written back, and hashed, exactly as they were (plans record the
    # hash of the profile they were made from).
    omit_when_none: ClassVar[frozenset[str]] = frozenset()
    # Fields a version-1 document never had (their validated defaults, then): left out of a
    # record whose schema_version is 1, so it is written back as it was read.
    omit_in_version_1: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.omit_when_none:
            if data.get(name, ...) is None:
                del data[name]
        if getattr(self, "schema_version", None) == 1:
            for name in self.omit_in_version_1:
                data.pop(name, None)
        return data

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, allow_nan=False, sort_keys=False)

    def content_hash(self) -> str:
        """sha256 of the canonical JSON form; a plan stores its profile's hash."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, allow_nan=False,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _json_path(loc: tuple) -> str:
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _readable_versions(cls: type[Record]) -> tuple:
    """The schema versions ``cls`` reads: its ``schema_version`` Literal (older ones included)."""
    field = cls.model_fields.get("schema_version")
    if field is None:
        return ()
    return get_args(field.annotation) or (field.default,)


# How much of a bad value an error message shows: a field's value, never a whole document.
_SHOWN_VALUE_CHARS = 80


class RecordProblem(RecordError):
    """A ``RecordError`` whose message is a sentence of its own, not "expected X, got Y"."""

    def __init__(self, source: str, path: str, message: str, actual: object = None):
        super().__init__(source, path, message, actual)
        self.args = (f"{source}: at {path}: {message}",)

    def __str__(self) -> str:
        return self.args[0]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[:_SHOWN_VALUE_CHARS - 3] + "..."


def _newest(readable: tuple) -> int | None:
    numbers = [v for v in readable if isinstance(v, int) and not isinstance(v, bool)]
    return max(numbers) if numbers else None


def _validation_error(source: str, exc: ValidationError) -> RecordError:
    """The first problem, as the field's JSON path and its value (a nested object's keys only:
    a cross-field check's "input" is the whole object, thousands of characters of it)."""
    first = exc.errors()[0]
    path = _json_path(first["loc"])
    message = first["msg"]
    message = message.removeprefix("Value error, ")
    if first["type"] == "missing":
        return RecordProblem(source, path, "field required (missing)")
    if first["type"] == "extra_forbidden":
        return RecordProblem(source, path, "extra inputs are not permitted: an unknown field (a file written by a "
                                           "newer asam-tune? then upgrade asam-tune)", first.get("input"))
    actual = first.get("input", "<missing>")
    if isinstance(actual, (dict, list)):
        return RecordProblem(source, path, message[:1].lower() + message[1:], actual)
    return RecordProblem(source, path, f"{message[:1].lower() + message[1:]}, got {_shown(actual)}", actual)


def parse_record(cls: type[R], document: Any, source: str = "<document>") -> R:
    """Validate an already-decoded JSON document; raise ``RecordError`` on the first problem."""
    if not isinstance(document, dict):
        raise RecordError(source, "$", "a JSON object", type(document).__name__)
    # The kind first: a profile handed in as a plan is the wrong document, whatever its version.
    kind = cls.model_fields.get("kind")
    if kind is not None and "kind" in document and document["kind"] != kind.default:
        raise RecordError(source, "$.kind", f"{kind.default!r}", document["kind"])
    declared = document.get("schema_version")
    readable = _readable_versions(cls)
    if readable and declared not in readable:
        newest = _newest(readable)
        if isinstance(declared, int) and not isinstance(declared, bool) and newest is not None and declared > newest:
            raise RecordProblem(source, "$.schema_version",
                                f"schema_version {declared} was written by a newer asam-tune (this one reads "
                                f"{' or '.join(map(str, readable))}): upgrade asam-tune "
                                "(pip install --upgrade asam-tune)", declared)
        raise RecordError(source, "$.schema_version", " or ".join(repr(v) for v in readable), declared)
    try:
        # Validate in JSON mode: strict about types, yet JSON arrays are accepted as tuples.
        text = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecordError(source, "$", "JSON-serialisable finite values", str(exc)) from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        raise _validation_error(source, exc) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def load_record(cls: type[R], path: str | os.PathLike) -> R:
    """Read, decode and validate a record file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(source, "$", "an existing file", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(source, "$", "a readable UTF-8 file", str(exc)) from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError and NaN/Infinity literals
        raise RecordError(source, "$", "valid JSON with finite numbers", str(exc)) from None
    return parse_record(cls, document, source)


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, not after minutes of measuring, when ``path`` cannot be written."""
    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"cannot write {str(path)!r}: it is a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK):
        raise UserInputError(f"cannot write {str(path)!r}: its folder is not writable")


def _creation_mode() -> int:
    """0666 less the umask: the mode ``open()`` gives a new file (``mkstemp`` gives 0600, which
    would keep profiles and plans from the rest of a cluster group)."""
    try:
        # Linux >= 4.7 shows it without changing it (os.umask would, for every thread at once).
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of it; a new
    file gets the usual mode (0644 under the common umask 022)."""
    check_writable(path)
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UserInputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, _creation_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise UserInputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
        raise


def dump_record(record: Record, path: str | os.PathLike) -> None:
    write_atomic(path, record.to_json() + "\n")


def save_or_keep(record: Record, path: str | os.PathLike, what: str) -> None:
    """``dump_record``, and when that fails (a full disk, a folder gone read-only) the record is
    written to a temporary file instead, which the error names: minutes of measuring are not
    lost to a failed final write."""
    try:
        dump_record(record, path)
    except UserInputError as exc:
        try:
            fd, kept = tempfile.mkstemp(prefix=f"asam-tune-{what}-", suffix=".json")
            os.fchmod(fd, _creation_mode())
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(record.to_json() + "\n")
        except OSError as second:
            raise UserInputError(f"{exc}; keeping the {what} in a temporary file failed too "
                                 f"({second.strerror or second})") from None
        raise UserInputError(f"{exc}; the {what} is kept in {kept}: move it where you want it") from None

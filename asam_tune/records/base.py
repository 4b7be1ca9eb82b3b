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

    @model_serializer(mode="wrap")
    def _omit_unset_additions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        for name in self.omit_when_none:
            if data.get(name, ...) is None:
                del data[name]
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
        raise RecordError(source, "$.schema_version", " or ".join(repr(v) for v in readable), declared)
    try:
        # Validate in JSON mode: strict about types, yet JSON arrays are accepted as tuples.
        text = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RecordError(source, "$", "JSON-serialisable finite values", str(exc)) from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        actual = first.get("input", "<missing>")
        if first["type"] == "missing":
            actual = "<missing>"
        raise RecordError(source, _json_path(first["loc"]), first["msg"].lower(), actual) from None


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


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of it."""
    check_writable(path)
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UserInputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    try:
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

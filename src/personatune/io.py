"""File I/O every layer shares: atomic writes, JSONL, hashing, text decoding, and the
one rule for replacing an output folder.

This module sits at the bottom: it imports nothing of personatune's but the error type.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from personatune.errors import PersonatuneError


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) through a temporary file in the same folder and a rename,
    so a reader never sees half a file and a crash leaves the old file in place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON, atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (see :func:`write_text`)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def jsonl_records(path: Path, text: str | None = None) -> Iterator[tuple[int, object]]:
    """``(line number, parsed value)`` for each non-blank line of a JSONL file, numbered
    from 1. ``text`` is the file's contents when already read (default: read as UTF-8).

    Raises:
        PersonatuneError: ``PATH:line N: invalid JSON (reason)``, or the file is missing.
    """
    if text is None:
        text = read_text(Path(path))
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise PersonatuneError(f"{path}:line {n}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise PersonatuneError(f"{path}:line {n}: JSON nested too deeply to read") from None
        yield n, value


def read_jsonl(path: Path) -> list:
    """Every non-blank line of a JSONL file, parsed (see :func:`jsonl_records`)."""
    return [value for _, value in jsonl_records(path)]


def read_json(path: Path) -> object:
    """A JSON file's value (see :func:`parse_json`).

    Raises:
        PersonatuneError: the file is missing, a folder, or not valid JSON.
    """
    return parse_json(read_text(Path(path)), path)


def parse_json(text: str, path: Path | str) -> object:
    """The value of the JSON document ``text``, read from ``path`` (named in errors).

    Raises:
        PersonatuneError: ``PATH: line N: invalid JSON (reason)``, or nested too deeply.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PersonatuneError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise PersonatuneError(f"{path}: JSON nested too deeply to read") from None


def read_text(path: Path, encoding: str = "utf-8", what: str = "file") -> str:
    """Decode a text file. UTF-8 also accepts a BOM; a UTF-16/32 byte-order mark is
    followed whatever ``encoding`` says, since the mark is unambiguous. ``what`` names the
    file in messages (``data file``).

    Raises:
        PersonatuneError: the file is missing or a folder, the encoding is unknown, or
            the bytes are not valid in it (names the line and a likely fix).
    """
    path = Path(path)
    if path.is_dir():
        raise PersonatuneError(f"{path}: is a folder, not a {what}; give the path of a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PersonatuneError(f"{path}: no such {what}; check the path") from None
    except PermissionError:
        raise PersonatuneError(f"{path}: not readable (permission denied)") from None
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    # UTF-32 first: UTF-16 LE's byte-order mark is the start of UTF-32 LE's
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        enc = "utf-32"
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        enc = "utf-16"
    # NUL bytes never occur in text; they are the mark of UTF-16 written without a BOM
    hint = "utf-16" if b"\x00" in raw[:4096] else "cp1252"
    fix = "re-save the file as UTF-8"
    if what == "data file":
        fix += f" or set this source's encoding (e.g. encoding: {hint})"
    try:
        text = raw.decode(enc)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PersonatuneError(
            f"{path}: line {line} is not valid {encoding} (byte {e.start}); {fix}"
        ) from None
    except LookupError:
        raise PersonatuneError(f"{path}: unknown encoding '{encoding}'") from None
    if "\x00" in text and enc.startswith("utf-8"):
        line = text[: text.index("\x00")].count("\n") + 1
        raise PersonatuneError(
            f"{path}: line {line} holds NUL bytes, so it is not {encoding} text; {fix}"
        )
    return text


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks (memory stays flat)."""
    return files_hash([path]).removeprefix("sha256:")


def digest(obj: object) -> str:
    """sha256 hex digest of ``obj`` written as sorted JSON (a cache key)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def files_hash(paths: Iterable[Path]) -> str:
    """``sha256:HEX`` over the bytes of ``paths`` in order, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def package_dir(module: str, needed_for: str, install: str) -> Path:
    """The folder of the installed package ``module``, found without importing it (the
    model packages' ``__init__`` imports what personatune does not need).

    Raises:
        PersonatuneError: not installed; the message names ``needed_for`` and ``install``
            (the pip command).
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PersonatuneError(f"{needed_for}: {install}")
    return Path(spec.submodule_search_locations[0])


def partial_dir(output: Path) -> Path:
    """The work folder beside ``output`` where a run builds its result (``.NAME.partial``)."""
    output = Path(output)
    return output.parent / f".{output.name}.partial"


def check_replaceable(
    target: Path, kind: str, protect: Iterable[Path], signature: Iterable[str]
) -> None:
    """Refuse to let ``--overwrite`` remove anything personatune did not write.

    A folder ``target`` may be replaced only when it holds every file named in
    ``signature`` (the files every ``kind`` folder personatune writes holds, e.g. a
    persona's ``adapter_config.json`` and ``config.yaml``) or nothing at all, and never
    when it is the current directory, one above it or the home folder, or when it holds a
    path of ``protect`` (the spec folder, its data files). A file ``target`` may be
    replaced unless it is in ``protect``. ``kind`` names the output in messages
    (``persona directory``...).

    Raises:
        PersonatuneError: one line naming ``target`` and why it is kept.
    """
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        return check_replaceable_file(target, kind, protect)
    real = target.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve():
        raise PersonatuneError(
            f"{target}: refusing to replace the current directory or one above it; "
            "choose a new output folder"
        )
    for kept in (Path(p).resolve() for p in protect):
        if kept == real or real in kept.parents:
            raise PersonatuneError(
                f"{target}: holds {kept.name}, an input of this run; choose a new output folder"
            )
    if all((target / name).exists() for name in signature) or not any(target.iterdir()):
        return
    raise PersonatuneError(
        f"{target}: not a {kind} that personatune wrote (no {' or '.join(signature)}); "
        "--overwrite replaces only those: choose a new output folder"
    )


def check_replaceable_file(
    target: Path, kind: str, protect: Iterable[Path], keys: Iterable[str] = ()
) -> None:
    """Refuse to let ``--overwrite`` replace a file personatune did not write: one of
    ``protect`` (the spec, data, the persona's own files), a folder, or a JSON report
    that lacks any of ``keys`` (the keys every ``kind`` personatune writes holds; for
    files other than JSON, pass the JSON report written beside it instead).

    Raises:
        PersonatuneError: one line naming ``target`` and why it is kept.
    """
    target = Path(target)
    if not target.exists():
        return
    if target.is_dir():
        raise PersonatuneError(f"{target}: is a folder; give the path of a {kind} file")
    if target.resolve() in {Path(p).resolve() for p in protect}:
        raise PersonatuneError(f"{target}: is an input of this run; choose another output")
    keys = list(keys)
    if not keys:
        return
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict) or not all(k in data for k in keys):
        raise PersonatuneError(
            f"{target}: not a {kind} that personatune wrote; --overwrite replaces only "
            "those: choose another output"
        )


def check_writable(target: Path, what: str = "output") -> None:
    """Refuse, before any work, an output that cannot be created: its nearest existing
    folder is a file, or a probe folder cannot be made there (read-only, ``/proc``, no
    permission). Leaves nothing behind.

    Raises:
        PersonatuneError: one line naming ``target`` and the reason.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir() and what.endswith(("folder", "directory")):
        raise PersonatuneError(f"{target}: is a file, not a {what}; choose a folder")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PersonatuneError(f"{target}: {parent} is a file, so the {what} cannot go there")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".personatune-probe-", dir=parent))
    except OSError as e:
        raise PersonatuneError(
            f"{target}: cannot write the {what} in {parent} ({e.strerror}); "
            "choose a folder you can write to"
        ) from None


@contextlib.contextmanager
def building(output: Path) -> Iterator[Path]:
    """Yield a new, empty work folder beside ``output`` (``.NAME.partial-XXXX``, normal
    permissions); when the block ends it is published as ``output`` (:func:`publish`), and
    if the block raises it is removed, so ``output`` appears whole or not at all.

    Raises:
        PersonatuneError: the folder cannot be made there (read-only, no permission).
    """
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as e:
        raise PersonatuneError(
            f"{output}: cannot write there ({e.strerror}); choose a folder you can write to"
        ) from None
    work.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is a normal folder
    try:
        yield work
        publish(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def publish(work: Path, output: Path) -> None:
    """Move the finished ``work`` folder to ``output``, replacing an old ``output`` last
    (callers check it with :func:`check_replaceable` first)."""
    work, output = Path(work), Path(output)
    old = output.parent / f".{output.name}.old{os.getpid()}"
    if output.exists():
        output.rename(old)
    work.rename(output)
    shutil.rmtree(old, ignore_errors=True)

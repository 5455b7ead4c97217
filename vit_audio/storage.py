"""Files written whole or not at all, faults of the machine told from faults of a file, paths as a
person reads them, and ASVspoof-style score files."""

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]


class MachineFault(Exception):
    """A fault of the machine or of the place a run writes to (a full disk, no memory, no permission,
    a killed worker), not of the file being read: the run stops with this message, and a rerun tries
    that file again (it is never listed as unusable)."""


# errno values that say the machine failed, whichever file was being read or written
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EROFS, errno.EMFILE, errno.ENFILE}


def is_machine_fault(error):
    return isinstance(error, (MachineFault, MemoryError)) or (
        isinstance(error, OSError) and error.errno in MACHINE_ERRNOS
    )


def write_fault(path, error):
    """The MachineFault of an OSError `error` met while writing `path`."""
    return MachineFault(f"cannot write {display_path(path)}: {error.strerror or error}")


def machine_fault_reason(error):
    """One line for a machine fault: "out of memory", or the error's own text."""
    return "out of memory" if isinstance(error, MemoryError) else str(error)


def _new_file_mode():
    """The mode open() gives a new file (0o666 less the umask): mkstemp's private 0o600 would hide
    datasets and checkpoints from the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Write to a temporary file beside `path`, then rename: readers never see half a file.
    A link keeps pointing where it did (the file it leads to is replaced). A pipe, a device, or a
    name under /dev or /proc (/dev/stdout: whatever the shell redirected it to) is a stream that
    replacing would cut off from its reader, so it is written straight through. A failed write (a
    full disk, no permission) raises MachineFault naming `path`."""
    path = Path(path)
    try:
        if path.as_posix().startswith(("/dev/", "/proc/")) or (path.exists() and not path.is_file()):
            with open(path, mode) as handle:
                yield handle
            return
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_fault(path, error) from None
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise write_fault(path, error) from None
        raise


def save_npy_atomic(path, array):
    with atomic_write(path) as handle:
        np.save(handle, array)


def save_csv_atomic(path, frame):
    with atomic_write(path, "w") as handle:
        frame.to_csv(handle, index=False)


def save_json_atomic(path, obj):
    with atomic_write(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)


def display_path(path):
    """A path as a reader should see it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def is_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path):
    """A path as text that any table can hold: bytes of a name that are not UTF-8 (which Python keeps
    as lone surrogates) written as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def score_file_token(text):
    """`text` as one score-file field, percent-encoded where it must be, so that distinct texts stay
    distinct: whitespace (which would split it), '%', a leading '#' (numpy's genfromtxt, which the
    ASVspoof scorer reads with, drops the line as a comment) and the bytes of a file name that are
    not UTF-8 (Python keeps each as a lone surrogate, U+DC80-U+DCFF)."""

    def encoded(index, char):
        if "\udc80" <= char <= "\udcff":
            return f"%{ord(char) - 0xDC00:02X}"
        if char.isspace() or char == "%" or (index == 0 and char == "#"):
            return "".join(f"%{byte:02X}" for byte in char.encode())
        return char

    return "".join(encoded(index, char) for index, char in enumerate(str(text)))


def score_file_ids(relative_paths):
    """One id per file: its name without extension (ASVspoof's utterance ids) when no two files share
    one, else every file's path relative to the inputs; always one whitespace-free token."""
    paths = [Path(p).as_posix() for p in relative_paths]
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(
            f"a score file needs one line per file, but {len(repeated)} path(s) are listed twice: "
            f"{', '.join(repeated[:3])}"
        )
    names = [Path(p).stem for p in paths]
    return [score_file_token(i) for i in (names if len(set(names)) == len(names) else paths)]


def write_score_file(path, files):
    """ASVspoof-style score file, one line per file: `FILE_ID SCORE ATTACK KEY` (higher = bona fide)."""
    ids = score_file_ids(files["original_path"])
    lines = [
        f"{file_id} {row.score:.6f} {score_file_token(row.attack) if isinstance(row.attack, str) else '-'} "
        f"{'bonafide' if row.label == 0 else 'spoof'}"
        for file_id, row in zip(ids, files.itertuples())
    ]
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def read_score_file(path):
    """Read a score file written by write_score_file (labels and attacks optional)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) not in (2, 4):  # an id split by a space would shift every field after it
                raise ValueError
            score = float(parts[1])
        except ValueError:
            raise ValueError(
                f"{path}:{number}: expected 'FILE_ID SCORE [ATTACK KEY]', got {line!r}"
            ) from None
        key = parts[3] if len(parts) > 3 else None
        if key not in (None, "bonafide", "spoof"):
            raise ValueError(f"{path}:{number}: key {key!r} is neither 'bonafide' nor 'spoof'")
        rows.append(
            dict(
                file_id=parts[0],
                score=score,
                attack=parts[2] if len(parts) > 2 else None,
                label=None if key is None else int(key == "spoof"),
            )
        )
    return pd.DataFrame(rows)


def check_output_path(path):
    """Fail before any work is done when no file can be written at `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the name of the file to write")
    if path.exists() and not path.is_file():  # a pipe or device (/dev/stdout) is written straight through
        if not os.access(path, os.W_OK):
            raise ValueError(f"cannot write to {path}")
        return
    folder = next(parent for parent in path.resolve().parents if parent.exists())  # where a link leads
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {folder} is not a folder this process can write to")

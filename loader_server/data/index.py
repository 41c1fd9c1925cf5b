"""The data set index: which files exist and their labels, held in a few compact numpy arrays.

Paths live in one uint8 blob plus an int64 offset array, so that a million samples cost a few
tens of megabytes, and forked workers reading them touch no Python object per sample (no
copy-on-access growth). Nothing here opens or stats an image: bad files surface when decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np

from loader_client.contract.errors import ConfigError

from .file_access import check_exists, os_error
from .reading import DEFAULT_MAX_FILE_BYTES, DecodeError, Version, read_file
from .remote import is_remote, redact, storage_of

if TYPE_CHECKING:
    from .remote import RemoteStorage

log = logging.getLogger("loader_server")

__all__ = ["IMAGE_EXTENSIONS", "DatasetIndex", "load_class_folders", "load_index", "load_list_file"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class DatasetIndex:
    """Samples ``i = 0..n-1``: the path of each file (relative to `root` unless absolute) and its label."""

    root: str
    blob: np.ndarray  # uint8, all paths concatenated (file system encoding)
    offsets: np.ndarray  # int64, len n+1: path i is blob[offsets[i]:offsets[i+1]]
    labels: np.ndarray  # int64, len n
    class_names: tuple[str, ...] | None
    source: str
    #: Reads the samples that are objects (``s3://``, ``https://``), where any are.
    remote: RemoteStorage | None = None
    #: Workers read and decode each file into the batch (see datasets.Dataset).
    build: ClassVar[Literal["decode", "gather"]] = "decode"

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        """Full path of sample `i`."""
        name = os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes())
        if self.remote is not None:
            if is_remote(name):
                return name
            if is_remote(self.root):
                return f"{self.root.rstrip('/')}/{name}"
        return os.path.join(self.root, name)

    def describe(self, i: int) -> str:
        """What names sample `i` in messages: its path (a URL without its userinfo or presigned signature)."""
        return redact(self.path(i)) if self.remote is not None else self.path(i)

    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        """The bytes of sample `i`: its whole file (DecodeError naming it when it cannot be read)."""
        path = self.path(i)
        limit = DEFAULT_MAX_FILE_BYTES if max_bytes is None else max_bytes
        if self.remote is not None and is_remote(path):
            return self.remote.read(path, limit)
        return read_file(path, limit)

    def version(self, i: int) -> Version | None:
        """What a cached record of sample `i` is checked against: the file's size, mtime, inode and device
        (None when it cannot be stat'ed: the read that follows says why); of an object, its ETag's hash and
        size as the store last said (None once it changed since indexing)."""
        path = self.path(i)
        if self.remote is not None and is_remote(path):
            return self.remote.version(path)
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev

    def location(self) -> str:
        """The resolved folder the paths are relative to (each file's device is in its version)."""
        return f"files under {self.root}"

    def fingerprint(self) -> str:
        """Hash of paths and labels: a resumed run refuses an index that changed."""
        h = hashlib.blake2b(digest_size=8)
        for arr in (self.blob, self.offsets, self.labels):
            h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()


MISSING_HINT = (": give a list file of `path label` lines, a folder of class sub-folders, tar shards "
                "('shards/train-{000000..000099}.tar'), Parquet tables ('train-*.parquet') or numpy arrays "
                "(try `loader-server demo` for a sample)")


def load_index(data: str | os.PathLike[str]) -> DatasetIndex:
    """Load a list file (``path label`` or ``path,label`` lines) or a folder of class sub-folders."""
    import stat

    if stat.S_ISDIR(check_exists(data, "data set", MISSING_HINT).st_mode):
        return load_class_folders(data)
    return load_list_file(data)


def load_list_file(data: str | os.PathLike[str], storage: RemoteStorage | None = None) -> DatasetIndex:
    """Index a list file of ``path label`` or ``path,label`` lines (paths relative to its folder).

    The list file may be an object itself, and its lines may name objects (``s3://bucket/img/1.jpg 7``);
    the folders of the ``s3://`` objects are listed once here, so that every read finds its object
    as it was then (its ETag).
    """
    path: Path | str
    storage = storage or storage_of()
    if isinstance(data, str) and is_remote(data):
        path = data
        try:
            raw = storage.read(data)
        except DecodeError as exc:
            raise ConfigError(f"list file {exc}{_prefix_hint(data, exc, storage)}") from None
        root = data.rsplit("/", 1)[0]
    else:
        path = Path(data)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise os_error(exc, "list file", path) from None
        root = str(path.parent.resolve())
    raw = _without_bom(raw, path)
    fast = _parse_plain(raw)
    if fast is not None:
        return _with_objects(_build(root, fast[0], fast[1], None, f"list file {path}"), storage)
    paths: list[bytes] = []
    labels: list[int] = []
    append_path, append_label = paths.append, labels.append
    header_line = _first_content_line(raw)
    for lineno, line in enumerate(raw.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        ws = line.rsplit(None, 1)
        if len(ws) == 2 and b"," not in ws[1]:
            name, label = ws[0].rstrip().removesuffix(b",").rstrip(), ws[1]  # `path label`, `path, label`
        elif b"," in line:
            name, label = (s.strip() for s in line.rsplit(b",", 1))  # `path,label`
        else:
            name, label = b"", b""
        if not name or not label:
            raise ConfigError(
                f"{path}:{lineno}: malformed line {_show(line)}: expected `path label` or `path,label`"
            )
        try:
            value = int(label)
        except ValueError:
            if lineno == header_line and label.lower() == b"label":
                continue  # a CSV header such as `path,label`
            raise ConfigError(
                f"{path}:{lineno}: label {_show(label)} is not an integer in line {_show(line)}"
            ) from None
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{path}:{lineno}: label {_show(label)} does not fit a 64-bit integer (labels are "
                              "class numbers from 0)")
        append_path(name)
        append_label(value)
    if not paths:
        raise ConfigError(f"list file {str(path)!r} holds no samples (only blank or # lines)")
    return _with_objects(_build(root, paths, labels, None, f"list file {path}"), storage)


def _with_objects(index: DatasetIndex, storage: RemoteStorage) -> DatasetIndex:
    """The index with its remote storage where it names objects, their s3:// folders listed (one listing each)."""
    import dataclasses

    if not is_remote(index.root) and b"://" not in index.blob.tobytes():
        return index
    index = dataclasses.replace(index, remote=storage)
    folders = sorted({p.rsplit("/", 1)[0] + "/" for p in map(index.path, range(len(index))) if p.startswith("s3://")})
    for folder in folders:
        try:
            storage.list(folder, shallow=True)
        except DecodeError as exc:
            raise ConfigError(f"{index.source}: {exc}") from None
    return index


def _parse_plain(raw: bytes) -> tuple[list[bytes], np.ndarray] | None:
    """Fast path for the common file: every line exactly `path label`, no comments or commas.

    Returns None whenever anything is unusual, and the careful line-by-line parser (which
    names the offending line) takes over.
    """
    if any(c in raw for c in (b"#", b",", b"\r", b"\x0b", b"\x0c")):
        return None
    tokens = raw.split()
    arr = np.frombuffer(raw, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    if not raw.endswith(b"\n"):
        ends = np.append(ends, len(raw))
    # Exactly one space or tab inside every line, and two tokens per line on average:
    # then every line is exactly `path label` (no blank line, no space in a path).
    if not tokens or len(tokens) != 2 * len(ends):
        return None
    seps = np.flatnonzero((arr == 32) | (arr == 9))
    if len(seps) != len(ends) or not (np.searchsorted(ends, seps) == np.arange(len(ends))).all():
        return None
    try:
        labels = np.array(tokens[1::2]).astype(np.int64)
    except (ValueError, OverflowError):
        return None
    return tokens[0::2], labels


def load_class_folders(data: str | os.PathLike[str], storage: RemoteStorage | None = None) -> DatasetIndex:
    """Index ``root/<class>/<image>``: classes sorted by name, label = position (also under an s3:// prefix)."""
    if isinstance(data, str) and is_remote(data):
        return _remote_class_folders(data, storage or storage_of())
    root = Path(data)
    try:
        return _from_class_folders(root)
    except OSError as exc:
        raise os_error(exc, "data folder", root) from None


def _from_class_folders(root: Path) -> DatasetIndex:
    with os.scandir(root) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"folder {str(root)!r} has no class sub-folders: expected {root}/<class>/<image files>"
        )
    paths: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        with os.scandir(root / name) as entries:
            files = sorted(
                e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
            )
        paths.extend(os.fsencode(f"{name}/{f}") for f in files)
        labels.extend([label] * len(files))
    if not paths:
        raise ConfigError(
            f"folder {str(root)!r} holds no images with extensions {sorted(IMAGE_EXTENSIONS)} in its class "
            f"sub-folders (expected {root}/<class>/<image files>){_list_files_hint(root, classes)}"
        )
    listed = _list_files([root])
    if listed:  # a split's list file beside its class folders: serving every folder would mix the splits
        log.warning("%s is served as class folders (%d images in %d class%s); the list file%s %s beside them %s "
                    "not read: to serve only what one lists, pass it as --data", root, len(paths), len(classes),
                    "" if len(classes) == 1 else "es", "s" if len(listed) > 1 else "", ", ".join(listed),
                    "are" if len(listed) > 1 else "is")
    return _build(str(root.resolve()), paths, labels, tuple(classes), f"class folders {root}")


def _looks_listed(path: str) -> bool:
    """Whether the file's first line (of its first 4 KB) reads as `path label` or `path,label`."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        lines = f.read(4096).removeprefix(b"\xef\xbb\xbf").splitlines()
        first = next((line.strip() for line in lines if line.strip() and not line.startswith(b"#")), b"")
        return re.fullmatch(rb"\S.*[\s,]\s*(-?\d+|label)", first) is not None
    return False


def _list_files(folders: list[Path]) -> list[str]:
    """List files (``.txt`` or ``.csv`` whose first line reads as ``path label``) in `folders`, in order, at most
    three: a bounded look."""
    found: list[str] = []
    for folder in folders:
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            found.extend(sorted(os.path.join(folder, e.name) for e in entries
                                if e.name.endswith((".txt", ".csv")) and e.is_file() and _looks_listed(e.path)))
        if len(found) >= 3:
            break
    return found[:3]


def _list_files_hint(root: Path, classes: list[str]) -> str:
    """``; did you mean --data ROOT/sub/train.txt?`` for list files in `root` or one level down (a data set's
    parent folder given for the data set)."""
    found = _list_files([root, *(root / name for name in classes[:100])])
    if not found:
        return ""
    return f"; for a list file pass it: --data {' or --data '.join(found)}"


def _remote_class_folders(prefix: str, storage: RemoteStorage) -> DatasetIndex:
    """``s3://bucket/prefix/<class>/<image>``, from one listing of the prefix."""
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    try:
        found = storage.list(prefix)
    except DecodeError as exc:
        raise ConfigError(str(exc)) from None
    by_class: dict[str, list[str]] = {}
    for url in found:
        rel = url[len(prefix) :]
        name, sep, file = rel.partition("/")
        if not sep or "/" in file or name.startswith(".") or os.path.splitext(file)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        by_class.setdefault(name, []).append(file)
    if not by_class:
        raise ConfigError(f"prefix {prefix!r} has no class folders of images: expected {prefix}<class>/<image files> "
                          f"with extensions {sorted(IMAGE_EXTENSIONS)}")
    classes = sorted(by_class)
    paths = [f"{name}/{f}".encode() for name in classes for f in sorted(by_class[name])]
    labels = [label for label, name in enumerate(classes) for _ in by_class[name]]
    index = _build(prefix.rstrip("/"), paths, labels, tuple(classes), f"class folders {prefix}")
    import dataclasses

    return dataclasses.replace(index, remote=storage)


def _build(
    root: str, paths: list[bytes], labels: list[int] | np.ndarray, classes: tuple[str, ...] | None, source: str
) -> DatasetIndex:
    lengths = np.fromiter(map(len, paths), dtype=np.int64, count=len(paths))
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(paths), dtype=np.uint8)
    label_arr = labels if isinstance(labels, np.ndarray) else np.array(labels, dtype=np.int64)
    return DatasetIndex(root, blob, offsets, label_arr, classes, redact(source))


def _prefix_hint(data: str, exc: DecodeError, storage: RemoteStorage) -> str:
    """``; did you mean the prefix s3://b/shards/?`` for ``s3://b/shards`` named without its ``/`` when objects lie
    under it (an object name without the slash reads as a list file)."""
    if exc.code != "not_found" or not data.startswith("s3://") or data.endswith("/"):
        return ""
    if not storage.holds_objects(data + "/"):
        return ""
    shown = redact(data)
    return f"; objects lie under {shown}/: did you mean the prefix --data {shown}/ (a prefix ends with /)?"


def _without_bom(raw: bytes, path: Path | str) -> bytes:
    """The list file's bytes without the UTF-8 byte-order mark Windows editors write (else the first path would
    start with an invisible U+FEFF and be reported missing); a UTF-16 or UTF-32 file is refused by name."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        raise ConfigError(f"list file {path} is UTF-16 or UTF-32 text (it starts with that byte-order mark, as "
                          "PowerShell's `>` writes): save it as UTF-8, for example with "
                          f"`iconv -f UTF-16 -t UTF-8 {path} > train-utf8.txt`")
    return raw.removeprefix(b"\xef\xbb\xbf")


def _first_content_line(raw: bytes) -> int:
    for lineno, line in enumerate(raw.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith(b"#"):
            return lineno
    return 0


def _show(text: bytes) -> str:
    shown = text.decode("utf-8", "replace")
    return repr(shown if len(shown) <= 200 else shown[:200] + "...")

"""The data stamp: one hash of what the data files *contain*, for the ingest rule's ``params``.

Snakemake judges a folder input by the folder's own modification time, which changes when a file
is added, removed or renamed but not when one is overwritten in place, and a file input by its
own modification time, which ``touch`` or a copy moves without changing a byte. The ingest rule
therefore carries :func:`data_stamp`: a sha256 over every data file's relative path and the
sha256 of its bytes. Different bytes under the same name rerun ingest; the same bytes with a new
time (``touch``, ``cp``, a restore from backup) rerun nothing (the workflow marks the user's data
inputs ``ancient``, so Snakemake does not compare their times either).

Reading every image at every ``snakemake`` call would be slow on a large dataset, so each file's
content hash is cached in a JSON file (:data:`CACHE_NAME`; the workflow keeps it in the working
directory's ``.snakemake/segflow/``, beside Snakemake's record of the stamp), keyed by the
file's absolute path, size, modification time, status-change time (ctime) and inode: an unchanged
folder costs one ``stat`` per file. ctime cannot be set by a program, so a rewrite that puts the
old modification time back (``cp -p``, ``rsync -t``, ``touch -d``) still misses the cache and is
read again. The cache is only a shortcut: a missing, corrupt or unwritable one costs a re-read,
never a wrong stamp.

Hidden entries (names starting with ``.``, e.g. Snakemake's ``.snakemake_timestamp``, macOS
``._*`` files) are left out, as ingest skips them. A dangling symlink, a file that cannot be
read and anything that is not a regular file (a FIFO) count by name with a marker instead of a
content hash: the stamp never fails or blocks (ingest skips such an entry with a warning).

The demo folder is written by the workflow itself (rule generate_demo_data), which also writes
:data:`CONTENT_LIST` there: each generated file's content hash (:func:`write_content_list`).
:func:`demo_stamp` is the constant ``"demo"`` while the folder holds exactly what was generated
(or does not exist yet, or is about to be regenerated), so a fresh generation reruns ingest only
through its own output; a file edited in place makes it a content hash, which reruns ingest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from segflow.core.atomic import write_text

DIGEST_CHARS = 16
CHUNK_BYTES = 1 << 20
CACHE_NAME = "data_stamp.json"
CACHE_VERSION = 1
CONTENT_LIST = "contents.json"
DEMO_STAMP = "demo"
# Stand-ins for a content hash (never 64 hex characters, so no file's bytes can give them).
MISSING = "missing"
UNREADABLE = "unreadable"
NOT_A_FILE = "not-a-file"

log = logging.getLogger(__name__)

# (size, mtime_ns, ctime_ns, inode): a file whose four values are unchanged is not read again.
Key = tuple[int, int, int, int]


def _key(info: os.stat_result) -> Key:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def hash_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks of :data:`CHUNK_BYTES` (any file size).

    Args:
        path: a regular file.

    Returns:
        64 hex characters.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class ContentCache:
    """Per-file content hashes keyed by absolute path and :data:`Key`, kept in a JSON file.

    Args:
        path: the cache file; None keeps nothing between calls (every file is read).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, list[Any]] = self._load()
        self.seen: dict[str, list[Any]] = {}
        self.roots: list[str] = []
        self.changed = False

    def _load(self) -> dict[str, list[Any]]:
        if self.path is None:
            return {}
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, or damaged: every file is read once more
        if not isinstance(payload, dict) or payload.get("version") != CACHE_VERSION:
            return {}
        files = payload.get("files")
        return files if isinstance(files, dict) else {}

    def content_hash(self, path: Path) -> str:
        """``path``'s content hash, from the cache when its stat key is unchanged.

        Returns:
            64 hex characters, or :data:`MISSING` (dangling symlink, vanished),
            :data:`NOT_A_FILE` (FIFO, socket, device) or :data:`UNREADABLE` (permissions).
        """
        name = os.path.abspath(path)
        try:
            before = os.stat(path)
        except FileNotFoundError:
            return MISSING
        except OSError:
            return UNREADABLE
        if not stat.S_ISREG(before.st_mode):
            return NOT_A_FILE  # never opened: a FIFO would block the parse
        key = list(_key(before))
        cached = self.entries.get(name)
        if isinstance(cached, list) and len(cached) == 5 and cached[:4] == key:
            self.seen[name] = cached
            return str(cached[4])
        try:
            digest = hash_file(path)
            after = os.stat(path)
        except FileNotFoundError:
            return MISSING
        except OSError:
            return UNREADABLE
        if list(_key(after)) == key:  # not written to while it was read
            self.seen[name] = [*key, digest]
            self.changed = True
        return digest

    def visit(self, root: Path) -> None:
        """Record that every file under ``root`` was looked at (the others are forgotten)."""
        self.roots.append(os.path.abspath(root))

    def save(self) -> None:
        """Write the cache atomically when it changed: the files seen now, plus the entries of
        folders not looked at in this call (another configuration's data). An unwritable cache
        is logged and skipped."""
        if self.path is None:
            return

        def visited(name: str) -> bool:
            return any(name == root or name.startswith(root + os.sep) for root in self.roots)

        kept = {name: entry for name, entry in self.entries.items() if not visited(name)}
        files = {**kept, **self.seen}
        if not self.changed and files.keys() == self.entries.keys():
            return
        text = json.dumps({"version": CACHE_VERSION, "files": files}, separators=(",", ":"))
        try:
            write_text(self.path, text + "\n")
        except OSError as error:
            log.warning(
                "data stamp cache %s not written (%s); files are read again", self.path, error
            )


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of the non-hidden entries under ``root`` that are not
    folders, sorted; symlinked folders are followed once (a link loop ends there)."""
    found: list[tuple[str, Path]] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        with contextlib.suppress(OSError):
            info = os.stat(dirpath)
            if (info.st_dev, info.st_ino) in seen_dirs:
                dirnames[:] = []
                continue
            seen_dirs.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return iter(sorted(found))


def content_hashes(folder: str | os.PathLike[str], cache: ContentCache) -> dict[str, str]:
    """Relative posix path -> content hash (or marker) of every non-hidden file under ``folder``.

    Args:
        folder: an existing folder.
        cache: where known hashes come from and new ones go (saved by the caller).

    Returns:
        The mapping, sorted by path.
    """
    root = Path(folder)
    cache.visit(root)
    return {relative: cache.content_hash(path) for relative, path in _walk(root)}


def _digest(parts: Iterator[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:DIGEST_CHARS]


def data_stamp(*paths: str | os.PathLike[str], cache: str | os.PathLike[str] | None = None) -> str:
    """A short hash of the contents of the given folders and files.

    Args:
        paths: folders (every non-hidden file under them, recursively) or files; a missing one
            counts as missing.
        cache: the JSON file of known content hashes (see the module docstring); None: read
            every file.

    Returns:
        16 hex characters; it changes when a file's bytes, name or presence change, not when
        only its times do.
    """
    store = ContentCache(cache)

    def parts() -> Iterator[str]:
        for raw in paths:
            path = Path(raw)
            yield os.fspath(raw)
            if path.is_dir():
                for relative, content in content_hashes(path, store).items():
                    yield f"{relative}\0{content}"
            elif path.exists():
                store.visit(path)
                yield f"{path.name}\0{store.content_hash(path)}"
            else:
                yield MISSING

    stamp = _digest(parts())
    store.save()
    return stamp


def write_content_list(folder: str | os.PathLike[str], generator: Mapping[str, Any]) -> Path:
    """Write :data:`CONTENT_LIST` into ``folder``: what it holds now, for :func:`demo_stamp`.

    Args:
        folder: the freshly generated folder.
        generator: what produced it (the demo options), compared by :func:`demo_stamp` with the
            options the workflow would generate with now.

    Returns:
        The list's path.
    """
    root = Path(folder)
    files = {
        relative: digest
        for relative, digest in content_hashes(root, ContentCache(None)).items()
        if relative != CONTENT_LIST
    }
    target = root / CONTENT_LIST
    payload = {"generator": dict(generator), "files": files}
    write_text(target, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return target


def _read_content_list(path: Path) -> dict[str, Any] | None:
    """The content list; None when there is none (a folder from before the lists), ``{}`` when
    it is damaged (then nothing matches it)."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    if not (
        isinstance(payload, dict)
        and isinstance(payload.get("generator"), dict)
        and isinstance(payload.get("files"), dict)
    ):
        return {}
    return payload


def demo_stamp(
    folder: str | os.PathLike[str],
    generator: Mapping[str, Any],
    cache: str | os.PathLike[str] | None = None,
) -> str:
    """The stamp of the generated demo folder: ``"demo"`` unless a user changed its files.

    Args:
        folder: the demo folder (``demo.out_dir``).
        generator: the options it would be generated with now (``config["demo"]``'s options).
        cache: as for :func:`data_stamp`.

    Returns:
        ``"demo"`` when the folder is missing (generated later in this run), has no content
        list (generated before the lists existed), was generated with other options (it is
        regenerated in this run), or holds exactly the listed files with the listed contents;
        otherwise (an edited, added or removed file, a damaged list) ``"demo-"`` and 16 hex
        characters of its current contents.
    """
    root = Path(folder)
    if not root.is_dir():
        return DEMO_STAMP
    listing = _read_content_list(root / CONTENT_LIST)
    if listing is None or listing.get("generator", dict(generator)) != dict(generator):
        return DEMO_STAMP
    store = ContentCache(cache)
    current = {
        relative: digest
        for relative, digest in content_hashes(root, store).items()
        if relative != CONTENT_LIST
    }
    store.save()
    if current == listing.get("files"):
        return DEMO_STAMP
    return "demo-" + _digest(f"{relative}\0{digest}" for relative, digest in current.items())

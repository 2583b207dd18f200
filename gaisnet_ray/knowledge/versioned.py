"""One versioned, append-only store of folders on disk: the shape both knowledge stores share.

The global and per-edge adapter versions (``knowledge/vNNNN``, ``KnowledgeStore``) and the
foundation versions a relay writes (``knowledge/bases/bNNNN``, ``BaseStore``) are the same thing
on disk, so one class owns how a version is written, listed, checked and cut back::

    root/
      lineage.jsonl      one JSON record per published version, append-only (a convenience log)
      <p>0000/           a version: whatever the subclass writes, plus
        lineage.json     the caller's lineage + ``version`` + ``created_at``: the source of truth

Why each rule holds:
- *atomic publish*: a version is written into ``root/.tmp-<p>NNNN-<hex>``, every file and the
  folder are fsynced, then it is renamed into place and ``root`` is fsynced; a crash leaves either
  no version or a whole one (and perhaps a ``.tmp-`` folder, which ``truncate`` moves aside);
- *lineage*: ``lineage.json`` travels inside the folder, so a copied version still says where it
  came from; ``lineage.jsonl`` is appended (and fsynced) after the rename;
- *integrity*: ``verify`` says in one line what is wrong with a version (subclasses add their own
  content checks), ``damaged`` and ``latest_intact`` build on it;
- *truncation*: ``truncate(after=n, stash=...)`` is how ``--resume`` drops what a killed round
  left; the store rewrites its own lineage log instead of someone editing it from outside.

No torch, no peft: subclasses bring the content (``knowledge.store``, ``knowledge.bases``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import KnowledgeError

LINEAGE_NAME = "lineage.json"
HISTORY_NAME = "lineage.jsonl"
TMP_PREFIX = ".tmp-"


# --- durable file-system steps -------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable by themselves
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then every folder (deepest first), so a rename of ``path``
    can never publish a folder whose contents are still only in the page cache."""
    folders = []
    for here, _, files in os.walk(path):
        folders.append(Path(here))
        for name in files:
            with open(Path(here) / name, "rb") as fh:
                os.fsync(fh.fileno())
    for folder in reversed(folders):
        fsync_dir(folder)


def write_text_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (written beside it, fsynced, then renamed)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step, so no reader ever finds neither: Linux
    ``renameat2(RENAME_EXCHANGE)``, macOS ``renamex_np(RENAME_SWAP)``. False (nothing changed)
    where the OS or the file system cannot; the caller then falls back to two renames."""
    import ctypes
    import errno
    import sys

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn, at_fdcwd, rename_exchange = libc.renameat2, -100, 2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn, rename_swap = libc.renamex_np, 2
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(os.fsencode(a), os.fsencode(b), rename_swap)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


# --- the store -----------------------------------------------------------------------------------

class VersionedStore:
    """Append-only folders ``<prefix>NNNN`` under ``root``, each complete or absent.

    Subclasses set ``prefix`` (the folder letter) and ``noun`` (how messages name a version), write
    their content through :meth:`_publish`, and extend :meth:`_check_content` for :meth:`verify`.
    """

    prefix = "v"
    noun = "version"
    reserved_keys: tuple[str, ...] = ("version", "created_at")

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._folder_re = re.compile(rf"^{re.escape(self.prefix)}(\d{{4,}})$")

    # --- names -----------------------------------------------------------------------------------
    def folder(self, version: int) -> Path:
        """Where version ``version`` lives (or would): no check that it exists."""
        return self.root / f"{self.prefix}{version:04d}"

    def name(self, version: int) -> str:
        return self.folder(version).name

    def path(self, version: int) -> Path:
        """Folder of a published version; ``KnowledgeError`` naming the versions there are if not."""
        folder = self.folder(version)
        if not (folder / LINEAGE_NAME).is_file():
            raise KnowledgeError(f"{self.noun} {version} not found in {self.root}; have {self.versions()}")
        return folder

    # --- writing ---------------------------------------------------------------------------------
    def _publish(self, version: int, write: Callable[[Path], None], lineage: dict,
                 extra: Callable[[Path], dict] | None = None) -> Path:
        """Write version ``version`` atomically: ``write(tmp)`` fills a temporary folder, ``extra(tmp)``
        (optional) adds store-filled lineage keys from what was written, ``lineage.json`` goes in,
        everything is fsynced, the folder is renamed into place and the lineage log appended."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise KnowledgeError(f"{self.noun} must be an int >= 0; got {version!r}")
        clash = sorted(set(lineage) & set(self.reserved_keys))
        if clash:
            raise KnowledgeError(f"lineage keys {clash} are reserved; the store fills them in")
        final = self.folder(version)
        if final.exists():
            raise KnowledgeError(f"{self.noun} {version} already exists at {final}; versions are immutable")
        json.dumps(lineage)  # fails early, before anything is written, if lineage is not JSON-serializable
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            write(tmp)
            record = {**lineage, **(extra(tmp) if extra else {}), "version": version, "created_at": now_utc()}
            (tmp / LINEAGE_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            fsync_tree(tmp)
            os.rename(tmp, final)  # a folder that appeared meanwhile makes this fail, never merge
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)
        with open(self.root / HISTORY_NAME, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return final

    # --- reading ---------------------------------------------------------------------------------
    def folder_versions(self) -> list[int]:
        """Every ``<prefix>NNNN`` folder, ascending, with or without its lineage.json."""
        if not self.root.is_dir():
            return []
        found = (self._folder_re.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def versions(self) -> list[int]:
        """Published versions, ascending (temporary folders are ignored)."""
        return [v for v in self.folder_versions() if (self.folder(v) / LINEAGE_NAME).is_file()]

    def latest_version(self) -> int | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def lineage(self, version: int) -> dict:
        return json.loads((self.path(version) / LINEAGE_NAME).read_text(encoding="utf-8"))

    def history(self) -> list[dict]:
        """All records of lineage.jsonl, in publish order."""
        log = self.root / HISTORY_NAME
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]

    # --- integrity -------------------------------------------------------------------------------
    def verify(self, version: int, deep: bool = False) -> str | None:
        """None if version ``version`` is intact, else one line (starting with its folder name)
        saying what is wrong: a missing or unreadable lineage, or what ``_check_content`` finds
        (``deep``: also the checks that read every byte, where a store has cheaper ones)."""
        folder = self.folder(version)
        try:
            record = json.loads((folder / LINEAGE_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return f"{folder.name}: {LINEAGE_NAME} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{folder.name}: {LINEAGE_NAME} is unreadable ({type(e).__name__})"
        why = self._check_content(folder, record if isinstance(record, dict) else {}, deep)
        return None if why is None else f"{folder.name}: {why}"

    def _check_content(self, folder: Path, record: dict, deep: bool) -> str | None:
        """What is wrong with the files of ``folder`` given its lineage ``record`` (None: nothing)."""
        return None

    def damaged(self) -> dict[int, str]:
        """Version -> reason, for every version folder that fails :meth:`verify`, including one whose
        lineage.json is gone (:meth:`versions` does not list it: publish renames a complete folder
        into place, so such a folder was damaged afterwards)."""
        return {v: why for v in self.folder_versions() if (why := self.verify(v)) is not None}

    def latest_intact(self, up_to: int | None = None) -> tuple[int | None, dict[int, str]]:
        """The newest version (at most ``up_to``) that passes :meth:`verify`, and the newer ones skipped
        on the way, each with its reason. Older versions are not checked (they are not needed)."""
        skipped: dict[int, str] = {}
        for v in reversed(self.versions()):
            if up_to is not None and v > up_to:
                continue
            why = self.verify(v)
            if why is None:
                return v, skipped
            skipped[v] = why
        return None, skipped

    # --- truncation (resume) ---------------------------------------------------------------------
    def truncate(self, after: int, stash: str | Path) -> list[Path]:
        """Keep versions ``0..after``; move every later version folder and every leftover temporary
        folder into ``stash`` (same names; nothing is deleted), and cut ``lineage.jsonl`` back to the
        kept versions, the cut records going to ``stash/lineage.jsonl``. A log line that does not
        parse (a killed append) counts as cut. Returns where each moved folder went."""
        stash = Path(stash)
        moved: list[Path] = []
        if not self.root.is_dir():
            return moved
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            m = self._folder_re.match(folder.name)
            if (m and int(m.group(1)) > after) or folder.name.startswith(TMP_PREFIX):
                stash.mkdir(parents=True, exist_ok=True)
                moved.append(Path(shutil.move(str(folder), str(stash / folder.name))))
        log = self.root / HISTORY_NAME
        if log.is_file():
            keep, later = [], []
            for line in log.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    (keep if _logged_version(line, after) else later).append(line)
            if later:
                stash.mkdir(parents=True, exist_ok=True)
                write_text_durably(stash / HISTORY_NAME, "\n".join(later) + "\n")
                write_text_durably(log, "".join(x + "\n" for x in keep))
        if moved:
            fsync_dir(self.root)
        return moved


def _logged_version(line: str, after: int) -> bool:
    """True when a lineage.jsonl line is a whole record of a version at most ``after``."""
    try:
        version = json.loads(line).get("version", 0)
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(version, int) and version <= after

"""The artifact store: `<root>/<stage>/<fingerprint>/` directories committed by a manifest.

The root is a local directory (default `./data`, or `KILN_DATA`) or any fsspec URL
(`s3://bucket/prefix`, `file:///...`, `memory://...`).

Commit protocol
- local disk: a stage writes into `<stage>/.staging-<fp>/` while holding an exclusive lock on
  `<stage>/.locks/<fp>.lock`; every file is written under a temporary name and renamed when
  complete, so a staging directory only ever holds whole files (a killed run resumes from
  them). The manifest is written last, then the directory is renamed into place: readers see
  the whole artifact or nothing. A second process asking for the same artifact waits on the
  lock, then finds the committed artifact.
- object stores: files are written in place, the manifest last; the manifest is the commit.
  A directory without a valid manifest is never read; a killed build resumes from the whole
  objects it left (an object appears whole or not at all). Two runs asking for the same
  artifact take turns through a lease object created with a conditional write (`ObjectLease`).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.atomic import atomic_file, atomic_write_bytes, is_temporary, swap_into_place
from storage.manifest import MANIFEST_NAME, FileEntry, Manifest, StorageError, is_inner_path

log = logging.getLogger("kiln.storage")

# How much of an artifact is checked before it is used: "content" (the default) is sha256 of
# every file whose stat changed since its sha256 was last confirmed; "sha256" hashes every file.
Verify = Literal["none", "size", "content", "sha256"]
STAMPS_DIR = ".verified"
STAGE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*", re.IGNORECASE)
FINGERPRINT = re.compile(r"[A-Za-z0-9_-]{1,128}")  # one safe path component (Kiln's own are 64 hex digits)
FINGERPRINT_PREFIX = re.compile(r"[A-Za-z0-9_-]{6,128}")  # and so no glob pattern
STAGING_PREFIX = ".staging-"


# What the writers of this process wrote, file by file: {artifact key: {relpath: (bytes, sha256)}},
# hashed as the bytes went out. A unit run in a worker process (or on another node) hands its
# entries back with its result (pipelines/executor.py), so `commit` takes the sizes and hashes
# from here instead of reading every file again; a file not in here is read and hashed.
_WRITTEN: dict[str, dict[str, tuple[int, str]]] = {}


def take_written() -> dict[str, dict[str, tuple[int, str]]]:
    """The entries recorded in this process since the last call (and forget them)."""
    taken = {key: dict(files) for key, files in _WRITTEN.items()}
    _WRITTEN.clear()
    return taken


def add_written(entries: dict[str, dict[str, tuple[int, str]]]) -> None:
    """Entries a unit recorded elsewhere (another process, another node)."""
    for key, files in entries.items():
        _WRITTEN.setdefault(key, {}).update({path: (size, digest) for path, (size, digest) in files.items()})


class _Hashing:
    """A binary file handle that hashes and counts what is written through it."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.digest, self.bytes = handle, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self.handle, name)


def default_root() -> str:
    return os.environ.get("KILN_DATA") or "./data"


def sha256_of(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def local_sha256(path: str | os.PathLike) -> str:
    """sha256 of a local file, read in blocks."""
    return sha256_of(fsspec.filesystem("file"), str(path))


class ArtifactStore:
    def __init__(self, root: str | os.PathLike | None = None, **storage_options: Any):
        url = str(root) if root is not None else default_root()
        self.url = url
        self.storage_options = storage_options
        options = dict(storage_options)
        if "://" in url and not url.startswith("file://"):
            # units on other processes and nodes write here: a cached listing would be stale
            options.setdefault("use_listings_cache", False)
        self.fs, self.root = fsspec.core.url_to_fs(url, **options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = str(Path(self.root).resolve())
            self.url = self.root

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    # ---------------------------------------------------------------- paths

    def stage_dir(self, stage: str) -> str:
        if not STAGE_NAME.fullmatch(stage):
            raise StorageError(f"{stage!r}: not a stage name (letters, digits, '-' and '_')")
        return posixpath.join(self.root, stage)

    def artifact_dir(self, stage: str, fp: str) -> str:
        if not FINGERPRINT.fullmatch(fp):
            raise StorageError(f"{fp!r}: not a fingerprint")
        return posixpath.join(self.stage_dir(stage), fp)

    def check_usable(self, writable: bool = True) -> None:
        """Fail now, in one line, when the store cannot hold artifacts: a local root that is a
        file, or that cannot be created or written to."""
        if not self.is_local:
            return
        root = Path(self.root)
        if root.exists() and not root.is_dir():
            raise StorageError(f"{root}: not a directory (the data directory must be one)")
        if not writable:
            if not root.exists():  # a reader of a store that is not there: a typo, not "0 artifacts"
                raise StorageError(f"{root}: no such data directory")
            return
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{err.filename or root}: cannot be created ({err.strerror or err})") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise StorageError(f"{root}: not writable (permission denied or a read-only file system)")

    def local_path(self, manifest: Manifest, relpath: str = "") -> Path:
        """A local filesystem path inside a committed artifact (local stores only)."""
        if not self.is_local:
            raise StorageError(f"{self.url}: not a local store; read through store.open()")
        return Path(self.artifact_dir(manifest.stage, manifest.fingerprint), relpath)

    def local_dir(self, manifest: Manifest, prefix: str, scratch: Path) -> Path:
        """A local directory holding an artifact's files under `prefix` ("" for all of them):
        the artifact itself on a local store, a copy in `scratch` from an object store."""
        if self.is_local:
            return self.local_path(manifest, prefix)
        target = Path(scratch) / f"{manifest.stage}-{manifest.short}" / prefix
        entries = manifest.files_under(prefix) if prefix else manifest.files
        for entry in entries:
            relative = posixpath.relpath(entry.path, prefix or ".")
            if not is_inner_path(relative):  # a validated manifest never gets here; a hand-made one might
                raise StorageError(f"{manifest.stage}/{manifest.short}: {entry.path!r} "
                                   f"is outside {prefix or 'the artifact'}")
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            with self.open(manifest, entry.path) as src, open(destination, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return target

    def uri(self, manifest: Manifest, relpath: str = "") -> str:
        path = posixpath.join(self.artifact_dir(manifest.stage, manifest.fingerprint), relpath)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def open(self, manifest: Manifest, relpath: str, mode: str = "rb"):
        return self.fs.open(posixpath.join(self.artifact_dir(manifest.stage, manifest.fingerprint), relpath), mode)

    # ---------------------------------------------------------------- reading

    def get(self, stage: str, fp: str, verify: Verify = "content") -> Manifest | None:
        """The committed artifact, or None when it is absent or fails verification."""
        directory = self.artifact_dir(stage, fp)
        manifest, problem = self._read_manifest(stage, fp)
        if manifest is None:
            if problem:
                log.warning("%s: %s; treating the artifact as missing", posixpath.join(directory, MANIFEST_NAME),
                            problem)
            return None
        problems = self.problems(manifest, verify)
        if problems:
            log.warning("%s: %s; the artifact will be rebuilt", posixpath.join(directory, problems[0].split(":")[0]),
                        problems[0].split(": ", 1)[1])
            return None
        return manifest

    def _read_manifest(self, stage: str, fp: str) -> tuple[Manifest | None, str | None]:
        """The manifest of `stage/fp`, or None and what is wrong with it (None when it is absent)."""
        directory = self.artifact_dir(stage, fp)
        manifest_path = posixpath.join(directory, MANIFEST_NAME)
        try:
            manifest = Manifest.from_json(self.fs.cat_file(manifest_path), manifest_path)
        except FileNotFoundError:
            return None, None
        except StorageError as err:
            return None, str(err).removeprefix(f"{manifest_path}: ")
        if manifest.stage != stage or manifest.fingerprint != fp:
            return None, f"names {manifest.stage}/{manifest.fingerprint}"
        manifest.location = self.fs.unstrip_protocol(directory) if not self.is_local else directory
        return manifest, None

    def problems(self, manifest: Manifest, verify: Verify = "sha256") -> list[str]:
        """What is wrong with a committed artifact's files (empty when it is intact).

        "content": a file is hashed only when its stamp (size, mtime, ctime, inode; size and
        ETag on object stores) differs from the one recorded when its sha256 last matched the
        manifest. No write leaves the stamp unchanged (the kernel sets ctime on every change
        and nothing can set it back), so a rerun of a large store hashes only what changed;
        `kiln verify` hashes everything (damage below the filesystem: bit rot)."""
        if verify == "none":
            return []
        directory = self.artifact_dir(manifest.stage, manifest.fingerprint)
        stamps = self._stamps(manifest) if verify == "content" else {}
        found, confirmed = [], {}
        for entry in manifest.files:
            path = posixpath.join(directory, entry.path)
            try:
                stamp = self._stamp(path)
            except FileNotFoundError:
                found.append(f"{entry.path}: missing")
                continue
            if stamp[0] != entry.bytes:
                found.append(f"{entry.path}: {stamp[0]} bytes, manifest says {entry.bytes}")
            elif verify == "size" or (verify == "content" and stamps.get(entry.path) == stamp):
                confirmed[entry.path] = stamp
            elif sha256_of(self.fs, path) != entry.sha256:
                found.append(f"{entry.path}: sha256 differs from the manifest")
            else:
                confirmed[entry.path] = stamp
        if verify in ("content", "sha256") and not found and confirmed != stamps:
            self._write_stamps(manifest, confirmed)
        return found

    def _stamp(self, path: str) -> list:
        if self.is_local:
            st = os.stat(path)
            return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        info = self.fs.info(path)
        return [info.get("size"), info.get("ETag") or info.get("LastModified") or info.get("mtime")]

    def _stamps_path(self, manifest: Manifest) -> str:
        return posixpath.join(self.stage_dir(manifest.stage), STAMPS_DIR, f"{manifest.fingerprint}.json")

    def _stamps(self, manifest: Manifest) -> dict[str, list]:
        try:
            value = json.loads(self.fs.cat_file(self._stamps_path(manifest)))
        except (FileNotFoundError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write_stamps(self, manifest: Manifest, stamps: dict[str, list]) -> None:
        """Remember the files' stamps as of their last sha256 match (best effort: a store that
        cannot take the write is only hashed again next time)."""
        data = json.dumps(stamps, sort_keys=True).encode()
        try:
            if self.is_local:
                atomic_write_bytes(self._stamps_path(manifest), data)
            else:
                self.fs.pipe_file(self._stamps_path(manifest), data)
        except OSError as err:
            log.debug("%s: stamps not written (%s)", self._stamps_path(manifest), err)

    def list(self, stage: str | None = None, damaged: list[str] | None = None) -> list[Manifest]:
        """The committed artifacts (of one stage, or all), oldest first. A manifest that cannot
        be read is left out, and named in `damaged` when the caller passes a list for it."""
        stages = [stage] if stage else self.stages()
        found = []
        for name in stages:
            for path in self.fs.glob(posixpath.join(self.stage_dir(name), "*", MANIFEST_NAME)):
                fp = posixpath.basename(posixpath.dirname(path))
                if not FINGERPRINT.fullmatch(fp):
                    continue
                manifest, problem = self._read_manifest(name, fp)
                if manifest is not None:
                    found.append(manifest)
                elif problem and damaged is not None:
                    damaged.append(f"{name}/{fp}/{MANIFEST_NAME}: {problem}")
        return sorted(found, key=lambda m: m.created)

    def stages(self) -> builtins.list[str]:  # builtins: `list` here is the method above
        """The stage directories under the root. Anything else there (`lost+found`, which every
        ext4 volume's root has, a `backup.old`) is not Kiln's: skipped with a warning."""
        if not self.fs.exists(self.root):
            return []
        names = []
        for path in self.fs.ls(self.root, detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if name.startswith((".", "_")) or not self.fs.isdir(path):
                continue
            if STAGE_NAME.fullmatch(name):
                names.append(name)
            else:
                log.warning("%s: not a stage directory (not a stage name); skipped", posixpath.join(self.root, name))
        return sorted(names)

    def find(self, fp_or_prefix: str) -> Manifest:
        """The artifact whose fingerprint is (or starts with) the given string, in any stage."""
        prefix = fp_or_prefix.strip()
        if len(prefix) < 6:
            raise StorageError(f"{prefix!r}: give at least 6 characters of a fingerprint")
        if not FINGERPRINT_PREFIX.fullmatch(prefix):
            raise StorageError(f"{prefix!r}: not a fingerprint (letters and digits)")
        matches = [
            m for stage in self.stages()
            for path in self.fs.glob(posixpath.join(self.stage_dir(stage), prefix + "*", MANIFEST_NAME))
            if (m := self.get(stage, posixpath.basename(posixpath.dirname(path)), verify="none"))
        ]
        if not matches:
            raise StorageError(f"{prefix}: no artifact with this fingerprint in {self.url}")
        if len({m.fingerprint for m in matches}) > 1:
            raise StorageError(f"{prefix}: ambiguous, matches {', '.join(m.short for m in matches)}")
        return matches[0]

    def lineage(self, fp_or_prefix: str, _path: tuple[str, ...] = ()) -> dict[str, Any]:
        """The tree of manifests an artifact was made from, down to its crawl sources. A manifest
        that names one of its own descendants as an input (only a hand-edited one can) ends its
        branch with `"cycle": true`."""
        manifest = self.find(fp_or_prefix)
        if manifest.fingerprint in _path:
            return {"stage": manifest.stage, "fingerprint": manifest.fingerprint, "cycle": True, "inputs": []}
        node: dict[str, Any] = {
            "stage": manifest.stage,
            "fingerprint": manifest.fingerprint,
            "config": manifest.config,
            "created": manifest.created,
            "sources": manifest.sources,
            "inputs": [],
        }
        for parent in manifest.inputs:
            try:
                node["inputs"].append(self.lineage(parent, (*_path, manifest.fingerprint)))
            except StorageError:
                node["inputs"].append({"fingerprint": parent, "missing": True, "inputs": []})
        return node

    # ---------------------------------------------------------------- writing

    def produce(
        self,
        stage: str,
        fp: str,
        build: Callable[[ArtifactWriter], dict[str, Any] | None],
        *,
        config: dict[str, Any],
        inputs: builtins.list[str],
        code_version: str,
        force: bool = False,
        verify: Verify = "content",
    ) -> Manifest:
        """Return the committed artifact `stage/fp`, building it with `build(writer)` if needed.

        `build` writes files through the writer and returns the stats for the manifest.
        """
        if not force and (existing := self.get(stage, fp, verify)):
            return existing
        with self._lock(stage, fp) as lock_fd:
            if not force and (existing := self.get(stage, fp, verify)):
                return existing  # another process built it while we waited
            self._remove_abandoned_staging(stage, keep=fp)
            writer = ArtifactWriter(self, stage, fp, config, inputs, code_version)
            writer.lock_fd = lock_fd
            writer.prepare(fresh=force)
            try:
                stats = build(writer) or {}
            except BaseException:
                writer.discard_if_empty()  # nothing to resume from: leave nothing behind
                raise
            manifest = writer.commit(stats)
            manifest.built = True
            return manifest

    @contextlib.contextmanager
    def _lock(self, stage: str, fp: str) -> Iterator[int | None]:
        """An exclusive lock per artifact: flock on local disk, a lease object on object stores.
        Yields the lock file's descriptor on local disk: a process that inherits it holds the lock
        with us, and after us if we are killed (the training launcher, see model/launch.py)."""
        if not self.is_local:
            lease = posixpath.join(self.stage_dir(stage), ".locks", f"{fp}.lease")
            with ObjectLease(self.fs, lease, f"{stage}/{fp[:12]}"):
                yield None
            return
        lock_dir = Path(self.stage_dir(stage), ".locks")
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{fp}.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s/%s is being built by another run; waiting for it", stage, fp[:12])
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield handle.fileno()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _remove_abandoned_staging(self, stage: str, keep: str) -> None:
        """Staging directories of other fingerprints that nobody holds a lock on are leftovers."""
        if not self.is_local:
            return
        stage_dir = Path(self.stage_dir(stage))
        for staging in stage_dir.glob(STAGING_PREFIX + "*"):
            fp = staging.name[len(STAGING_PREFIX):]
            if fp == keep:
                continue
            with open(stage_dir / ".locks" / f"{fp}.lock", "a+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run is building it
                shutil.rmtree(staging, ignore_errors=True)
                fcntl.flock(handle, fcntl.LOCK_UN)


def _dead_here(owner: str) -> bool:
    """Whether a lease's owner (host:pid:token) was a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class ObjectLease:
    """Who builds an artifact on an object store: a lease object created with a conditional write
    (If-None-Match: *, so of two runs exactly one creates it), renewed by its holder every
    LEASE_S / 3 seconds and deleted when the build ends. Another run waits while the lease is
    fresh (then finds the artifact committed), and takes over a lease whose holder stopped
    renewing it (a killed run) once it is LEASE_S old, or at once when that run was a process of
    this host that is gone."""

    LEASE_S = 60.0

    def __init__(self, fs, path: str, what: str):
        self.fs, self.path, self.what = fs, path, what
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.LEASE_S}).encode()

    def _create(self) -> bool:
        try:
            self.fs.pipe_file(self.path, self._body(), mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:  # a filesystem without conditional writes: the manifest alone commits
            log.debug("%s: no conditional writes on this store; no lease", self.path)
            return True

    def __enter__(self) -> ObjectLease:
        waited = False
        while not self._create():
            try:
                lease = json.loads(self.fs.cat_file(self.path))
                expired = float(lease.get("expires", 0)) < time.time() or _dead_here(str(lease.get("owner")))
            except (FileNotFoundError, ValueError, TypeError):
                continue  # released (or half-written) meanwhile: try again
            if expired:
                log.warning("%s: taking over the lease of a run that stopped (%s)", self.what, lease.get("owner"))
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)
                continue
            if not waited:
                log.warning("%s is being built by another run (%s); waiting for it", self.what, lease.get("owner"))
                waited = True
            time.sleep(min(5.0, self.LEASE_S / 6))
        self._renewer = threading.Thread(target=self._renew, daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.LEASE_S / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease lasts LEASE_S
                self.fs.pipe_file(self.path, self._body())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            if json.loads(self.fs.cat_file(self.path)).get("owner") == self.owner:
                self.fs.rm_file(self.path)


class ArtifactWriter:
    """Writes one artifact's files; `commit()` makes it visible.

    Stage code writes with `open()`, `write_bytes()`, `write_json()` or `write_parquet()`, using
    paths relative to the artifact. A file becomes visible in the working directory only when
    it is complete, so `done(path)` tells a resumed run which pieces it can skip.
    The writer is picklable (it carries the store URL, not open handles), so worker processes
    can write their own shards.
    """

    def __init__(self, store: ArtifactStore, stage: str, fp: str, config: dict, inputs: list[str], code_version: str):
        self.store_url = store.url
        self.storage_options = store.storage_options
        self.lock_fd: int | None = None  # the artifact's lock, in the building process only (see produce)
        self.stage = stage
        self.fingerprint = fp
        self.config = config
        self.inputs = list(inputs)
        self.code_version = code_version
        self.sources: list[dict[str, Any]] = []
        self._rows: dict[str, int] = {}
        self._store: ArtifactStore | None = store

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = ArtifactStore(self.store_url, **self.storage_options)
        return self._store

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.store.fs

    @property
    def workdir(self) -> str:
        store = self.store
        if store.is_local:
            return posixpath.join(store.stage_dir(self.stage), STAGING_PREFIX + self.fingerprint)
        return store.artifact_dir(self.stage, self.fingerprint)

    def path(self, relpath: str) -> str:
        return posixpath.join(self.workdir, relpath)

    def local_path(self, relpath: str) -> Path:
        """A path on local disk for libraries that only write local files (local stores only)."""
        if not self.store.is_local:
            raise StorageError(f"{self.store_url}: {relpath} needs a local store")
        return Path(self.path(relpath))

    def prepare(self, fresh: bool) -> None:
        """Make the working directory; a resumed one keeps its whole files and loses the
        temporary ones of writers that were killed (this run holds the artifact's lock)."""
        if fresh and self.fs.exists(self.workdir):
            self.fs.rm(self.workdir, recursive=True)
        self.fs.makedirs(self.workdir, exist_ok=True)
        for path in self.fs.find(self.workdir, withdirs=True) if not fresh else []:
            if is_temporary(path) and self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def discard_if_empty(self) -> None:
        """Remove the working directory of a failed build that wrote no complete file."""
        try:
            if self.store.is_local and not any(Path(self.workdir).rglob("*")):
                shutil.rmtree(self.workdir, ignore_errors=True)
        except OSError:
            pass

    def done(self, relpath: str) -> bool:
        """Whether a complete file already sits at relpath (written by an earlier, killed run)."""
        return self.fs.exists(self.path(relpath))

    def record_rows(self, relpath: str, rows: int) -> None:
        self._rows[relpath] = rows

    @property
    def key(self) -> str:
        return f"{self.store_url}|{self.stage}|{self.fingerprint}"

    @contextlib.contextmanager
    def open(self, relpath: str, mode: str = "wb") -> Iterator[BinaryIO]:
        """Write a file atomically (storage/atomic.py; on object stores an object appears whole,
        and the manifest commits), hashing it on the way out."""
        final = self.path(relpath)
        if not self.store.is_local:
            self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
            with self.fs.open(final, mode) as raw:
                handle = _Hashing(raw)
                yield handle  # type: ignore[misc]
        else:
            with atomic_file(final, mode) as raw:
                handle = _Hashing(raw)
                yield handle  # type: ignore[misc]
        _WRITTEN.setdefault(self.key, {})[relpath] = (handle.bytes, handle.digest.hexdigest())

    def write_bytes(self, relpath: str, data: bytes) -> None:
        with self.open(relpath) as handle:
            handle.write(data)

    def write_tree(self, local_dir: Path, prefix: str = "") -> None:
        """Every file under `local_dir` (written by a library that only writes local files, on
        scratch space), under `prefix` in the artifact: how such outputs reach an object store."""
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.write_bytes(posixpath.join(prefix, path.relative_to(local_dir).as_posix()), path.read_bytes())

    def write_json(self, relpath: str, value: Any) -> None:
        self.write_bytes(relpath, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).encode())

    def write_parquet(self, relpath: str, table, **options) -> None:
        import pyarrow.parquet as pq

        options.setdefault("compression", "zstd")
        buffer = io.BytesIO() if not self.store.is_local else None
        with self.open(relpath) as handle:
            pq.write_table(table, buffer or handle, **options)
            if buffer is not None:
                handle.write(buffer.getvalue())
        self.record_rows(relpath, table.num_rows)

    def _rows_of(self, relpath: str) -> int | None:
        """Rows as recorded, else from a Parquet footer (files written by worker processes,
        or by an earlier run that was interrupted)."""
        if relpath in self._rows or not relpath.endswith(".parquet"):
            return self._rows.get(relpath)
        import pyarrow.parquet as pq

        try:
            with self.fs.open(self.path(relpath), "rb") as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        except Exception:  # noqa: BLE001 - not readable as Parquet: its rows are unknown
            return None

    def _complete_files(self) -> dict[str, int]:
        """relpath -> bytes of every file in the working directory (one listing)."""
        root = self.workdir.rstrip("/") + "/"
        found = {}
        for path, info in self.fs.find(self.workdir, detail=True).items():
            relpath = path[len(root):] if path.startswith(root) else posixpath.relpath(path, self.workdir)
            if relpath == MANIFEST_NAME:
                continue
            if is_temporary(relpath):
                raise StorageError(f"{path}: a temporary file in the artifact being committed "
                                   f"(a writer did not finish); not committing")
            found[relpath] = int(info["size"])
        return dict(sorted(found.items()))

    def commit(self, stats: dict[str, Any]) -> Manifest:
        """Write the manifest (every file with its size and sha256: as recorded by whichever
        process wrote it, else read and hashed now) and make the artifact visible."""
        files = []
        recorded = _WRITTEN.pop(self.key, {})
        for relpath, size in self._complete_files().items():
            known = recorded.get(relpath)
            sha = known[1] if known and known[0] == size else sha256_of(self.fs, self.path(relpath))
            files.append(FileEntry(path=relpath, bytes=size, sha256=sha, rows=self._rows_of(relpath)))
        manifest = Manifest(
            stage=self.stage, fingerprint=self.fingerprint, config=self.config, inputs=self.inputs,
            code_version=self.code_version, files=files, stats=stats, sources=self.sources,
        )
        with self.open(MANIFEST_NAME) as handle:
            handle.write(manifest.to_json().encode())
        store = self.store
        final = store.artifact_dir(self.stage, self.fingerprint)
        if store.is_local:
            swap_into_place(Path(self.workdir), Path(final))
        store._write_stamps(manifest, {f.path: store._stamp(posixpath.join(final, f.path)) for f in files})
        committed = store.get(self.stage, self.fingerprint, verify="content")
        if committed is None:
            raise StorageError(f"{final}: the artifact just committed does not verify")
        return committed


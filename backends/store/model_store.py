"""The model store: the GGUF models this machine can run, in one directory.

Owns the layout (`<root>/<name>.gguf` + `<root>/<name>.json` manifest, partial files under
`<root>/.partial/`), model names, registering the bundled models (backends/store/bundled.py)
assembled from their packages, importing files and
downloading URLs. A model appears in the store only once complete and valid: every file is
finished under `.partial/` and moved into place with an atomic rename.

Several processes change one store (the app, its node, the CLI), so two file locks keep them
apart. A name being added is claimed (`.partial/<name>.claim`, locked for the whole add) so that
nobody else adds or removes it meanwhile; the store lock (`<root>/../.<root name>.lock`, beside
the store so that the store holds only models) is held only to claim a name and for the final
renames, so a long download never holds up another process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from builtins import list as List  # `ModelStore.list` hides the builtin in its class body
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from backends.errors import ModelStoreError
from backends.gguf_info import GGUFInfo, InvalidModelFile, read_gguf_info
from backends.store import file_lock
from backends.store.bundled import BUNDLED, TEST_MODEL, BundledModel, assemble
from backends.store.download import (
    DiskFull,
    DownloadCancelled,
    DownloadError,
    Progress,
    download_to_partial,
    sha256_file,
    sidecar_path,
)
from backends.store.model_facts import ModelFacts, model_facts

__all__ = [
    "DEFAULT_MODEL",
    "DiskFull",
    "DownloadCancelled",
    "DownloadError",
    "DuplicateModel",
    "HashMismatch",
    "InvalidModelFile",
    "InvalidModelName",
    "Manifest",
    "ModelEntry",
    "ModelExists",
    "ModelNotFound",
    "ModelStore",
    "ModelStoreError",
    "name_from_filename",
]

log = logging.getLogger(__name__)

# The small bundled model tests and benchmarks name in `ensure`. What a user gets when naming
# no model is `bundled.chat_model()`.
DEFAULT_MODEL = TEST_MODEL
MANIFEST_VERSION = 1
PARTIAL_DIR = ".partial"
COPY_CHUNK = 1 << 20
CLAIM_RETRY_S = 0.1  # how often ensure looks again while another process adds it
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")

Source = Literal["bundled", "import", "download", "copy"]


class ModelNotFound(ModelStoreError):
    """No model of that name in the store (the message lists the ones there are)."""


class ModelExists(ModelStoreError):
    """The name asked for is already taken."""


class InvalidModelName(ModelStoreError, ValueError):
    """A model name with characters the store does not allow."""


class HashMismatch(ModelStoreError):
    """The downloaded file's sha256 is not the one the caller expected."""


class DuplicateModel(ModelExists):
    """The file is one the store already holds under another name; `existing` names it."""

    def __init__(self, existing: str, what: str) -> None:
        super().__init__(
            f"{what} is already in the store as {existing!r} (the same sha256), so Covey kept "
            "that one copy and added nothing."
        )
        self.existing = existing


@dataclass(frozen=True)
class Manifest:
    """What the store knows about a model beyond the file: where it came from, its hash."""

    name: str
    filename: str
    size: int
    sha256: str | None
    source: Source
    url: str | None
    added: str  # ISO 8601, UTC
    version: int = MANIFEST_VERSION

    @classmethod
    def new(
        cls, name: str, size: int, sha256: str | None, source: Source, url: str | None = None
    ) -> Manifest:
        """The manifest of a model being added to the store now."""
        return cls(name=name, filename=f"{name}.gguf", size=size, sha256=sha256,
                   source=source, url=url, added=_now())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('version')!r} is not supported")
        return cls(
            name=str(data["name"]),
            filename=str(data["filename"]),
            size=int(data["size"]),
            sha256=data.get("sha256"),
            source=data["source"],
            url=data.get("url"),
            added=str(data["added"]),
        )


@dataclass(frozen=True)
class ModelEntry:
    """One model in the store."""

    name: str
    path: Path
    manifest: Manifest
    info: GGUFInfo

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "manifest": asdict(self.manifest),
            "info": self.info.to_dict(),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def name_from_filename(filename: str) -> str:
    """A store name from a file name: the stem, lowercased, other characters as '-'."""
    stem = filename.removesuffix(".gguf").removesuffix(".GGUF")
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("._-")
    name = re.sub(r"-{2,}", "-", name)[:128]
    if not _NAME_RE.fullmatch(name):
        raise InvalidModelName(
            f"Cannot make a model name from {filename!r}; give one explicitly (--name)."
        )
    return name


def check_name(name: str) -> str:
    """`name` if the store allows it, else InvalidModelName saying what is allowed."""
    if not _NAME_RE.fullmatch(name):
        raise InvalidModelName(
            f"{name!r} is not a valid model name: use 1 to 128 lowercase letters, digits, '.', "
            "'_' or '-', starting with a letter or digit."
        )
    return name


def _write_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_hashing(src: Path, dst: Path, progress: Progress | None = None) -> str:
    """Copy src to dst and return the sha256 of what was copied, in one pass."""
    digest = hashlib.sha256()
    total, done = src.stat().st_size, 0
    try:
        with src.open("rb") as fin, dst.open("wb") as fout:
            while block := fin.read(COPY_CHUNK):
                digest.update(block)
                fout.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as e:
        dst.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"Not enough disk space in {dst.parent} to copy {src.name} "
                f"({src.stat().st_size} bytes). Free some space and import again."
            ) from e
        raise ModelStoreError(f"Cannot copy {src} into the model store: {e.strerror}") from e
    return digest.hexdigest()


class ModelStore:
    """The models under one directory (normally `default_data_dir() / "models"`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.partial_dir = self.root / PARTIAL_DIR
        self.lock_path = self.root.parent / f".{self.root.name}.lock"
        self._lock = threading.Lock()
        self._claims: dict[str, int] = {}  # name -> the locked claim file this store holds
        self._bundled_lock = threading.Lock()
        # GGUF headers of big models take a while to read: cache them by (size, mtime).
        self._info_cache: dict[Path, tuple[int, int, GGUFInfo]] = {}

    # -- reading -------------------------------------------------------------------------

    def model_path(self, name: str) -> Path:
        return self.root / f"{name}.gguf"

    def manifest_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def names(self) -> list[str]:
        """Names of the model files in the store, sorted (without validating them)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.stem for p in self.root.glob("*.gguf") if _NAME_RE.fullmatch(p.stem) and p.is_file()
        )

    def _info(self, path: Path) -> GGUFInfo:
        st = path.stat()
        cached = self._info_cache.get(path)
        if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        return self._remember_info(path, read_gguf_info(path), st)

    def _remember_info(self, path: Path, info: GGUFInfo,
                       st: os.stat_result | None = None) -> GGUFInfo:
        # Keyed by size and mtime, like every entry: a file changed since is parsed again.
        st = st or path.stat()
        self._info_cache[path] = (st.st_size, st.st_mtime_ns, info)
        return info

    def _manifest(self, name: str, path: Path) -> Manifest:
        """The recorded manifest, or one made up for a .gguf someone put here by hand."""
        try:
            data = json.loads(self.manifest_path(name).read_text(encoding="utf-8"))
            return Manifest.from_dict(data)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable manifest for %s: %s", name, e)
        st = path.stat()
        return Manifest(
            name=name,
            filename=path.name,
            size=st.st_size,
            sha256=None,
            source="import",
            url=None,
            added=datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds"),
        )

    def _entry(self, name: str) -> ModelEntry:
        path = self.model_path(name)
        try:
            return ModelEntry(name=name, path=path, info=self._info(path),
                              manifest=self._manifest(name, path))
        except FileNotFoundError:  # never there, or removed while being read
            raise self._not_found(name) from None

    def _not_found(self, name: str) -> ModelNotFound:
        names = self.names()
        have = ", ".join(names) if names else "none yet"
        return ModelNotFound(
            f"No model named {name!r} in the store (models: {have}). Import a file or "
            "download one first."
        )

    def list(self) -> list[ModelEntry]:
        """Every valid model in the store, by name. Broken files are logged and left out."""
        entries: list[ModelEntry] = []
        for name in self.names():
            try:
                entries.append(self._entry(name))
            except (InvalidModelFile, ModelNotFound) as e:
                log.warning("model %s is not usable: %s", name, e)
        return entries

    def get(self, name: str) -> ModelEntry:
        """The model called `name`; ModelNotFound (listing the names there are) if none."""
        if not _NAME_RE.fullmatch(name):
            raise self._not_found(name)
        return self._entry(name)

    def facts(self, name: str) -> ModelFacts | None:
        """Parameters, quantization, context and size of a model; None if it is not usable."""
        try:
            return model_facts(self._info(self.model_path(name)))
        except (OSError, InvalidModelFile):
            return None

    def holder_of(self, sha256: str) -> str | None:
        """The name of the model in the store whose file has this sha256, if any."""
        for manifest in self.shareable():
            if manifest.sha256 == sha256.lower():
                return manifest.name
        return None

    def _refuse_duplicate(self, sha256: str, what: str) -> None:
        existing = self.holder_of(sha256)
        if existing is not None:
            raise DuplicateModel(existing, what)

    def resolve(self, name_or_path: str) -> Path:
        """The file to load: an existing GGUF file path as given, else a model in the store."""
        candidate = Path(name_or_path).expanduser()
        if candidate.is_file():
            read_gguf_info(candidate)  # InvalidModelFile says what is wrong with it
            return candidate
        if os.sep in name_or_path or name_or_path.endswith(".gguf"):
            names = ", ".join(self.names()) or "none yet"
            raise ModelNotFound(
                f"There is no file {name_or_path!r} and no model of that name in the store "
                f"(models: {names})."
            )
        return self.get(name_or_path).path

    # -- changing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _store_locked(self) -> Iterator[None]:
        """Hold the store lock (every process's) while changing what the store lists."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            file_lock.lock(fd)
            try:
                yield
            finally:
                file_lock.unlock(fd)
        finally:
            os.close(fd)

    def _claim_path(self, name: str) -> Path:
        return self.partial_dir / f"{name}.claim"

    def _lock_claim(self, name: str) -> int | None:
        """The claim file of `name`, locked; None if someone holds it. Needs the store lock:
        claim files are made and deleted only under it, so the one opened is the current one."""
        self._prepare()
        fd = os.open(self._claim_path(name), os.O_RDWR | os.O_CREAT, 0o644)
        if file_lock.lock(fd, wait=False):
            return fd
        os.close(fd)
        return None

    def _drop_claim(self, name: str, fd: int) -> None:
        """Give a claim up and delete its file (under the store lock, like `_lock_claim`)."""
        file_lock.unlock(fd)
        os.close(fd)  # first: Windows deletes no open file
        self._claim_path(name).unlink(missing_ok=True)

    def _claim(self, name: str, new: bool = True) -> None:
        """Hold `name` against every other writer of the store, in any process, until
        `_release(name)`: ModelExists if it is held already or (`new`) in the store."""
        with self._store_locked():
            fd = self._lock_claim(name)
            if fd is None:
                raise ModelExists(f"A model named {name!r} is being added right now.")
            if new and self.model_path(name).exists():
                self._drop_claim(name, fd)
                raise ModelExists(
                    f"A model named {name!r} is already in the store. Pick another name "
                    "(--name) or remove the existing one first."
                )
            with self._lock:
                self._claims[name] = fd

    def _release(self, name: str) -> None:
        with self._lock:
            fd = self._claims.pop(name, None)
        if fd is not None:
            with self._store_locked():
                self._drop_claim(name, fd)

    def claim(self, name: str) -> None:
        """Hold `name` for a model being added elsewhere (a copy from a peer) until
        `release(name)`; ModelExists if it is taken or busy, in this process or another."""
        self._claim(check_name(name))

    def release(self, name: str) -> None:
        self._release(name)

    def _commit(self, staged: Path, manifest: Manifest, replace: bool = False,
                info: GGUFInfo | None = None) -> ModelEntry:
        """Move a finished, validated file into the store with its manifest. Unless `replace`,
        a model that appeared under the name meanwhile (put there by hand, or by a program
        that does not claim names) is kept: the staged file is deleted and ModelExists says so.
        `info`: what validating the staged file found, so it is not parsed a second time.
        """
        name = manifest.name
        target = self.model_path(name)
        with self._store_locked():
            if not replace and target.exists():
                self._discard_partial(staged)
                raise ModelExists(
                    f"A model named {name!r} appeared in the store while this one was being "
                    "added; the one there is kept and this one was not added."
                )
            # The manifest goes first: a file without a manifest still lists (as an import),
            # a manifest without a file never does.
            _write_atomic(self.manifest_path(name), manifest.to_json())
            os.replace(staged, target)
            if info is not None:
                self._remember_info(target, dataclasses.replace(info, path=target))
        return self._entry(name)

    def _prepare(self) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True)

    def ensure(self, name: str, progress: Progress | None = None) -> ModelEntry:
        """The model called `name`; a bundled one (DEFAULT_MODEL, say) is assembled from its
        packages and registered on first use, `progress(done, total)` following the assembly.
        """
        if name in BUNDLED:
            return self.ensure_bundled(name, progress)
        return self.get(name)

    def ensure_bundled(self, name: str, progress: Progress | None = None) -> ModelEntry:
        """Register a bundled model (assembled from its packages, checked against its pinned
        sha256) if not there yet; `progress(done, total)` follows the assembly."""
        bundled = BUNDLED[name]
        with self._bundled_lock:
            entry = self._registered_bundled(bundled, adopt=False)  # usually: no lock at all
            if entry is not None:
                return entry
            while True:  # another process may be registering it: wait for it to finish
                try:
                    self._claim(name, new=False)
                    break
                except ModelExists:
                    time.sleep(CLAIM_RETRY_S)
            try:
                entry = self._registered_bundled(bundled, adopt=True)
                if entry is not None:
                    return entry
                staged = self.partial_dir / f"{name}.gguf"
                try:  # straight into .partial, then renamed: one copy, never a second
                    assemble(bundled, staged, progress)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise DiskFull(
                            f"Not enough disk space in {self.root} for the bundled model "
                            f"({bundled.size / 1e6:.0f} MB)."
                        ) from e
                    raise
                manifest = Manifest.new(name, bundled.size, bundled.sha256, "bundled")
                return self._commit(staged, manifest, replace=True)
            finally:
                self._release(name)

    def _registered_bundled(self, bundled: BundledModel, adopt: bool) -> ModelEntry | None:
        """The bundled model if registered and whole, None if it must be assembled (again);
        ModelExists if another model has its name. A copy of it put here by hand is adopted
        (hashed, given a manifest) if `adopt`, else None: adopting needs the name's claim."""
        name = bundled.name
        path = self.model_path(name)
        if not path.is_file():
            return None
        taken = ModelExists(
            f"The name {name!r} is taken by another model; remove it so the bundled "
            "model can be registered."
        )
        manifest = self._manifest(name, path)
        if manifest.sha256 is None:
            if not adopt:
                return None
            # A file someone put here by hand: adopt it only if it is the bundled one.
            if sha256_file(path) != bundled.sha256:
                raise taken
            manifest = Manifest.new(name, path.stat().st_size, bundled.sha256, "bundled")
            with self._store_locked():
                _write_atomic(self.manifest_path(name), manifest.to_json())
        if manifest.sha256 != bundled.sha256 and manifest.source != "bundled":
            raise taken
        # Trust the recorded hash rather than re-hashing hundreds of MB on every start.
        if manifest.sha256 == bundled.sha256 and manifest.size == path.stat().st_size:
            with contextlib.suppress(InvalidModelFile, ModelNotFound):
                return self._entry(name)
        return None  # the bundled copy is damaged: assemble it again

    def import_file(
        self, path: Path | str, name: str | None = None, progress: Progress | None = None,
        *, unique: bool = False,
    ) -> ModelEntry:
        """Copy a GGUF file into the store (validated first; the store is unchanged on error).
        With `unique`, a file the store already holds (same sha256) raises DuplicateModel
        naming the model that has it, and is not copied."""
        src = Path(path).expanduser()
        if not src.is_file():
            raise ModelNotFound(f"There is no file {str(src)!r} to import.")
        read_gguf_info(src)
        name = check_name(name) if name is not None else name_from_filename(src.name)
        what = f"The file {src.name}"
        size = src.stat().st_size
        # Hash before copying only if the store has a file of this size: one read, not two.
        if unique and any(m.size == size for m in self.shareable()):
            self._refuse_duplicate(sha256_file(src), what)
        self._claim(name)
        staged = self.partial_dir / f"{name}.gguf.import"
        try:
            sha256 = _copy_hashing(src, staged, progress)
            if unique:
                self._refuse_duplicate(sha256, what)
            read_gguf_info(staged)  # the copy, not just the source, must be whole
            manifest = Manifest.new(name, staged.stat().st_size, sha256, "import")
            return self._commit(staged, manifest)
        except BaseException:
            staged.unlink(missing_ok=True)  # an import's copy is worth nothing to a retry
            raise
        finally:
            self._release(name)

    def download(
        self,
        url: str,
        name: str | None = None,
        sha256: str | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        expected_size: int | None = None,
        timeout_s: float = 30,
        *,
        unique: bool = False,
    ) -> ModelEntry:
        """Download a GGUF by URL into the store, resuming an earlier partial download.

        Cancelling, or a full disk, keeps the partial file for the next try. A hash mismatch
        or an invalid file deletes it. The store changes only when the model is complete.
        With `unique`, a file the store already holds raises DuplicateModel (before fetching
        anything when `sha256` is given) and is not kept.
        """
        if name is None:
            last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
            name = name_from_filename(last)
        else:
            check_name(name)
        what = f"The file at {url}"
        if unique and sha256 is not None:  # known before a byte is fetched: fetch none
            self._refuse_duplicate(sha256, what)
        self._claim(name)
        try:
            partial = self.partial_dir / f"{name}.gguf.part"
            try:
                download_to_partial(
                    url,
                    partial,
                    expected_size=expected_size,
                    progress=progress,
                    cancel=cancel,
                    retries=retries,
                    backoff_s=backoff_s,
                    timeout_s=timeout_s,
                )
            except DownloadError:
                if not partial.exists() or partial.stat().st_size == 0:
                    self._discard_partial(partial)  # nothing worth resuming
                raise
            actual = sha256_file(partial)
            if sha256 is not None and actual != sha256.lower():
                self._discard_partial(partial)
                raise HashMismatch(
                    f"The file downloaded from {url} is not the one expected: its sha256 is "
                    f"{actual}, not {sha256.lower()}. It was deleted; check the URL and hash."
                )
            try:
                read_gguf_info(partial)
            except InvalidModelFile as e:
                self._discard_partial(partial)
                raise InvalidModelFile(
                    f"The file downloaded from {url} is not a usable model ({e}). It was "
                    "deleted; check that the URL points at a .gguf file."
                ) from e
            existing = self.holder_of(actual) if unique else None
            if existing is not None:
                self._discard_partial(partial)
                raise DuplicateModel(existing, what)
            manifest = Manifest.new(name, partial.stat().st_size, actual, "download", url)
            entry = self._commit(partial, manifest)
            sidecar_path(partial).unlink(missing_ok=True)
            return entry
        finally:
            self._release(name)

    @staticmethod
    def _discard_partial(partial: Path) -> None:
        partial.unlink(missing_ok=True)
        sidecar_path(partial).unlink(missing_ok=True)

    # -- copying from a peer (the transfer itself is the swarm's) -------------------------

    def shareable(self) -> List[Manifest]:
        """Models whose hash is known and whose file is whole: what peers may copy."""
        found = []
        for name in self.names():
            path = self.model_path(name)
            try:
                manifest = self._manifest(name, path)
                if manifest.sha256 and manifest.size == path.stat().st_size:
                    found.append(manifest)
            except OSError:
                continue  # removed while listing
        return found

    def _copy_partial_path(self, name: str) -> Path:
        return self.partial_dir / f"{name}.gguf.copy"

    def copy_resumable(self, name: str, sha256: str, size: int) -> int:
        """How many bytes of (`name`, `sha256`, `size`) an earlier copy left to resume (0 if
        none, or if what is there is not that file); reads only, writes nothing."""
        partial = self._copy_partial_path(name)
        previous: Any = None
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads(sidecar_path(partial).read_text(encoding="utf-8"))
        with contextlib.suppress(OSError):
            if previous == {"sha256": sha256, "size": size}:
                have = partial.stat().st_size
                return have if have <= size else 0
        return 0

    def free_bytes(self) -> int:
        """Free space on the disk that holds (or will hold) the store."""
        where = self.root
        while not where.exists() and where != where.parent:
            where = where.parent
        return shutil.disk_usage(where).free

    def copy_partial(self, name: str, sha256: str, size: int) -> Path:
        """The partial file a copy of (`name`, `sha256`) appends to, kept between tries.

        What is there is resumed only if it was a copy of the same file; anything else there
        is started over."""
        self._prepare()
        partial = self._copy_partial_path(name)
        if not self.copy_resumable(name, sha256, size):
            partial.unlink(missing_ok=True)
            _write_atomic(sidecar_path(partial), json.dumps({"sha256": sha256, "size": size}))
        return partial

    def check_copy_header(self, partial: Path, size: int) -> GGUFInfo | None:
        """The GGUF check of a copy while its tail still arrives: what the header says of a
        file of `size` bytes, or None if it is not all there yet or not valid (`finish_copy`
        then checks the finished file and says what is wrong). A copy only ever appends, so
        what this read is what the final sha256 covers."""
        try:
            return read_gguf_info(partial, size)
        except Exception:  # noqa: BLE001 - whatever it was, finish_copy checks the whole file
            return None

    def finish_copy(self, name: str, partial: Path, sha256: str, source: str,
                    actual: str | None = None, info: GGUFInfo | None = None) -> ModelEntry:
        """Verify a finished copy against the hash its owner published and add it. `actual`:
        the partial's sha256 as the copier hashed it while writing; None: read it here.
        `info`: what `check_copy_header` found while it arrived; None: check the file here.

        A wrong hash or an invalid file deletes the partial: the store is left unchanged."""
        actual = actual or sha256_file(partial)
        if actual != sha256:
            self._discard_partial(partial)
            raise HashMismatch(
                f"The copy of {name!r} from {source} is damaged: its sha256 is {actual}, not "
                f"the published {sha256}. It was deleted; the store is unchanged."
            )
        try:
            if info is None or info.file_size != partial.stat().st_size:
                info = read_gguf_info(partial)
        except InvalidModelFile as e:
            self._discard_partial(partial)
            raise InvalidModelFile(f"The copy of {name!r} from {source} is not usable: {e}") from e
        entry = self._commit(partial, Manifest.new(name, partial.stat().st_size, sha256, "copy",
                                                   url=None), info=info)
        sidecar_path(partial).unlink(missing_ok=True)
        return entry

    def rename(self, old: str, new: str) -> ModelEntry:
        """Give a model another name; its file, sha256 and origin stay as they are.

        A bad name, a name already taken or a bundled model (which Covey finds by its name)
        raise with a message saying so, and change nothing."""
        entry = self.get(old)
        check_name(new)
        if new == old:
            return entry
        if entry.manifest.source == "bundled":
            raise ModelStoreError(
                f"{old!r} comes with Covey, which finds it by that name; it cannot be renamed."
            )
        taken = ModelExists(f"There is already a model named {new!r}; pick another name.")
        if self.model_path(new).exists():
            raise taken
        self._claim(new)  # nobody adds `new` meanwhile
        try:
            with self._store_locked():
                if self.model_path(new).exists():  # put there by hand meanwhile
                    raise taken
                fd = self._lock_claim(old)
                if fd is None:
                    raise ModelStoreError(f"{old!r} is busy right now; try again after.")
                try:
                    manifest = dataclasses.replace(self._manifest(old, entry.path), name=new,
                                                   filename=f"{new}.gguf")
                    # The new manifest first, the old one last: a crash in between leaves
                    # one listed model, under one name or the other.
                    _write_atomic(self.manifest_path(new), manifest.to_json())
                    os.replace(entry.path, self.model_path(new))
                    self.manifest_path(old).unlink(missing_ok=True)
                finally:
                    self._drop_claim(old, fd)
        finally:
            self._release(new)
        self._info_cache.pop(entry.path, None)
        return self._entry(new)

    def remove(self, name: str) -> None:
        """Delete a model's file and manifest; ModelNotFound if there is no such model."""
        if not _NAME_RE.fullmatch(name) or not self.root.is_dir():
            raise self._not_found(name)
        path = self.model_path(name)
        with self._store_locked():
            fd = self._lock_claim(name)
            if fd is None:
                raise ModelStoreError(f"{name!r} is being added right now; try again after.")
            try:
                # The file first: a manifest without a file never lists.
                path.unlink()
                self.manifest_path(name).unlink(missing_ok=True)
            except FileNotFoundError:
                raise self._not_found(name) from None
            finally:
                self._drop_claim(name, fd)
        self._info_cache.pop(path, None)


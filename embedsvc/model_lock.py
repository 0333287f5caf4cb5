"""The sha256 of every file a model loads, kept beside models.yaml and checked at load.

`models.lock.json` (the models file's name with `.lock.json`) holds, per pinned model
(`hf_id@revision`), the sha256 of each file of its folder and, for an entry with remote
code, of each file of the code repository at `code_revision`. `embedsvc pull` writes it
(the Hub's own sha256 for LFS files, the fetched bytes' for the others); the shipped one
covers the bundled default model. At load every listed file must be there with its hash,
and no other file that a loader reads may be: a file that differs stops start-up with its
name. Hashing is cached (`~/.cache/embedsvc/sha256-v2.json`) by path, size, mtime, ctime and
inode, so a restart does not read the weights again; ctime and inode are what user code
cannot set back (an edit that keeps the size and restores the mtime still changes the
ctime), and `embedsvc verify` hashes everything again on demand. ONNX exports made by
`embedsvc export` are recorded in the entry too (`exports`: variant -> sha256 of
model.onnx) and checked when they load. A model without an entry loads unverified (a
WARNING, and `/info` says so).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedsvc.errors import ConfigError
from embedsvc.files import sha256_file, write_atomic

log = logging.getLogger(__name__)

LOCK_VERSION = 1
# Files a loader reads (weights, configs, tokenizers, remote code, the BGE-M3 head).
LOADED_SUFFIXES = (".safetensors", ".json", ".py", ".txt", ".model", ".pt")


@dataclass(frozen=True)
class LockedFiles:
    """One model's recorded hashes: folder files and remote-code files, by relative path."""

    files: dict[str, str]
    code: dict[str, str] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)  # ONNX variant -> model.onnx


def lock_path(models_file: Path) -> Path:
    """The lock beside a models file (the one committed with it)."""
    return models_file.with_name(models_file.stem + ".lock.json")


LOCK_ENV = "EMBEDSVC_MODELS_LOCK"


def cache_lock_path() -> Path:
    """The lock that travels with the Hugging Face cache: $HF_HOME/embedsvc/models.lock.json
    (HF_HOME as huggingface_hub reads it: the variable, else XDG_CACHE_HOME/huggingface,
    else ~/.cache/huggingface)."""
    home = os.environ.get("HF_HOME")
    if not home:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        home = os.path.join(cache, "huggingface")
    return Path(home) / "embedsvc" / "models.lock.json"


def second_lock(explicit: str | None = None) -> Path:
    """The lock read beside the models file's own: --models-lock, else EMBEDSVC_MODELS_LOCK,
    else the cache's (cache_lock_path)."""
    chosen = explicit or os.environ.get(LOCK_ENV)
    return Path(chosen) if chosen else cache_lock_path()


def write_lock_path(models_file: Path, explicit: str | None = None) -> Path:
    """Where `pull` and `export` record entries: --models-lock (or EMBEDSVC_MODELS_LOCK)
    when given; else beside the models file where that folder can be written (the lock to
    commit with it); else the cache's lock, which the server reads from the same cache (an
    image's models.yaml in a read-only site-packages, an init container filling a volume)."""
    if explicit or os.environ.get(LOCK_ENV):
        return second_lock(explicit)
    beside = lock_path(models_file)
    writable = beside.exists() and os.access(beside, os.W_OK)
    if writable or (not beside.exists() and os.access(beside.parent, os.W_OK)):
        return beside
    return cache_lock_path()


def read_locks(models_file: Path, explicit: str | None = None) -> dict[str, LockedFiles]:
    """The entries of the lock beside the models file and of the second lock; where both
    record a model differently, the one committed beside the models file holds (and a
    WARNING names it)."""
    beside = read_lock(lock_path(models_file))
    other_path = second_lock(explicit)
    if other_path.resolve() == lock_path(models_file).resolve():
        return beside
    merged = read_lock(other_path)
    for key, entry in beside.items():
        other = merged.get(key)
        if other is not None and (other.files, other.code) == (entry.files, entry.code):
            entry = LockedFiles(entry.files, entry.code, {**other.exports, **entry.exports})
        elif other is not None:
            log.warning(
                "%s records %s differently from %s; using the latter", other_path, key, models_file
            )
        merged[key] = entry
    return merged


def lock_key(hf_id: str, revision: str) -> str:
    return f"{hf_id}@{revision}"


def read_lock(path: Path) -> dict[str, LockedFiles]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return {
            key: LockedFiles(
                dict(entry["files"]), dict(entry.get("code", {})), dict(entry.get("exports", {}))
            )
            for key, entry in raw["models"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a models lock ({type(e).__name__}: {e})") from None


def write_entry(path: Path, key: str, locked: LockedFiles) -> None:
    """Add or replace one model's entry, the file replaced atomically."""
    raw: dict[str, Any] = {"version": LOCK_VERSION, "models": {}}
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
    entry: dict[str, Any] = {"files": dict(sorted(locked.files.items()))}
    if locked.code:
        entry["code"] = dict(sorted(locked.code.items()))
    if locked.exports:
        entry["exports"] = dict(sorted(locked.exports.items()))
    raw["models"][key] = entry
    raw["models"] = dict(sorted(raw["models"].items()))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (json.dumps(raw, indent=1) + "\n").encode())
    except OSError as e:
        raise ConfigError(
            f"cannot write the models lock {path} ({e}); name a file you can write with "
            f"--models-lock or {LOCK_ENV}"
        ) from None


def record_export(
    path: Path, key: str, variant: str, digest: str, known: LockedFiles | None = None
) -> bool:
    """Record an ONNX export's sha256 in the model's entry of the lock at `path` (`known`:
    the entry as read from every lock, when `path` has none of its own yet); False when
    the model has no entry anywhere (it is unverified, and so is its export)."""
    entry = read_lock(path).get(key) or known
    if entry is None:
        return False
    exports = {**entry.exports, variant: digest}
    write_entry(path, key, LockedFiles(entry.files, entry.code, exports))
    return True


# Folders inside a model folder that are not the model's: `embedsvc export`'s ONNX
# exports (checked against their export.json), and hidden ones (huggingface_hub's .cache).
NOT_THE_MODEL = ("embedsvc-onnx",)


def folder_files(folder: Path) -> list[str]:
    """Relative paths of the files under `folder` that a loader may read."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        top = rel.parts[0]
        if top in NOT_THE_MODEL or any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.name.endswith(LOADED_SUFFIXES):
            out.append(str(rel))
    return sorted(out)


def sha256_of(path: Path, rehash: bool = False) -> str:
    """The file's sha256: from the cache when its size, mtime, ctime and inode are as
    cached (none of which an edit leaves as they were: writing sets the ctime, and only
    the kernel does that), else (or with `rehash`) read anew."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    cache = _HashCache.get()
    hit = cache.entries.get(real)
    if not rehash and hit is not None and hit[:-1] == key:
        return str(hit[-1])
    digest = sha256_file(Path(real))
    cache.entries[real] = [*key, digest]
    cache.dirty = True
    return digest


def hash_folder(folder: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 per loaded file of `folder`; `known` (e.g. the Hub's LFS hashes) first."""
    known = known or {}
    return {rel: known.get(rel) or sha256_of(folder / rel) for rel in folder_files(folder)}


def differing(folder: Path, expected: dict[str, str], rehash: bool = False) -> list[str]:
    """The files of `expected` missing from `folder` or with another sha256."""
    return [
        rel
        for rel, want in sorted(expected.items())
        if not (folder / rel).is_file() or sha256_of(folder / rel, rehash) != want
    ]


def verify(what: str, folder: Path, expected: dict[str, str], rehash: bool = False) -> None:
    """Every file of `expected` in `folder` with its sha256, and no other loaded file."""
    for rel, want in sorted(expected.items()):
        path = folder / rel
        if not path.is_file():
            raise ConfigError(f"{what}: {rel} is missing from {folder} (the lock lists it)")
        got = sha256_of(path, rehash)
        if got != want:
            raise ConfigError(
                f"{what}: {path} differs from the pinned file (sha256 {got[:16]}..., the lock "
                f"says {want[:16]}...); fetch it again with `embedsvc pull`"
            )
    extra = [rel for rel in folder_files(folder) if rel not in expected]
    if extra:
        raise ConfigError(
            f"{what}: {folder} holds files the lock does not list ({', '.join(extra[:5])}); "
            "remove them, or pull the model again to record them"
        )
    _HashCache.get().save()


# Entries [size, mtime_ns, ctime_ns, inode, sha256]; the file of the earlier [size, mtime_ns,
# sha256] entries has another name, so an older embedsvc on the same machine reads its own.
CACHE_NAME = "sha256-v2.json"


class _HashCache:
    """path -> [size, mtime_ns, ctime_ns, inode, sha256], one file per user."""

    _instance: _HashCache | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dirty = False
        try:
            self.entries: dict[str, list[Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    @classmethod
    def get(cls) -> _HashCache:
        if cls._instance is None:
            base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
            cls._instance = cls(Path(base) / "embedsvc" / CACHE_NAME)
        return cls._instance

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(self.entries).encode())
            self.dirty = False
        except OSError as e:  # a read-only home: hashing again next start, nothing worse
            log.debug("cannot write %s: %s", self.path, e)

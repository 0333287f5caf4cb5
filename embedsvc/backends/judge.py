"""LLM rerankers (task rerank with `judge` in models.yaml: Qwen3-Reranker): a causal
language model asked whether a document meets a query, scored as its model card scores it,
the probability of "yes" against "no" as the next token after the prompt.

The engine builds each pair's ids from the prompt (engine/pairs.JudgeTemplate). Here the
decoder runs over the padded batch and only the last real position of each row goes
through the two rows of the language-model head that give the "yes" and "no" logits: the
backend returns yes - no, and the route's sigmoid of it is softmax([no, yes])[yes], the
card's score (`raw_scores` gives yes - no itself). The head's other rows are never used:
they are not kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedsvc.backends.base import BackendSpec, ForwardOutput, LoadedModel, PaddedBatch
from embedsvc.backends.bert import read_json
from embedsvc.backends.torch_common import (
    TorchThreads,
    guarded,
    load_transformers_model,
    log_loaded,
    pad_token_id_of,
)
from embedsvc.errors import ConfigError


class JudgeBackend(TorchThreads):
    def __init__(self, decoder: Any, yes_no: Any, device: str, dtype: str) -> None:
        self._decoder = decoder  # the causal LM without its head: ids -> hidden states
        self._yes_no = yes_no  # float32 [2, hidden]: the head's "yes" and "no" rows
        self.device = device
        self.dtype = dtype
        self.dimension = 1

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        import torch

        ids = torch.from_numpy(batch.input_ids).to(self.device)
        mask = torch.from_numpy(batch.attention_mask).to(self.device)

        def run() -> Any:
            states = self._decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1  # rows are padded on the right
            final = states[torch.arange(states.shape[0], device=states.device), last]
            yes, no = (final.to(torch.float32) @ self._yes_no.T).unbind(1)
            return (yes - no).unsqueeze(1).cpu().numpy()

        return ForwardOutput(guarded(self.device, run))


def _token_id(tokenizer: Any, word: str, name: str, spec: BackendSpec) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ConfigError(
            f"model {spec.name}: judge.{name} {word!r} must be one token of its tokenizer; "
            f"it is {len(ids)}"
        )
    return int(ids[0])


def load_judge(spec: BackendSpec, path: Path) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    judge = spec.judge
    if judge is None:
        raise ConfigError(f"model {spec.name}: an LLM reranker needs judge in models.yaml")
    model, device, dtype, tokenizer = load_transformers_model(spec, path, AutoModelForCausalLM)
    yes = _token_id(tokenizer, judge.yes, "yes", spec)
    no = _token_id(tokenizer, judge.no, "no", spec)
    head = model.get_output_embeddings().weight
    yes_no = head[[yes, no]].detach().to(device=device, dtype=torch.float32).clone()
    decoder = model.get_decoder()
    del model  # the head's other rows (all of them unless tied to the embeddings) go
    config = read_json(path / "config.json")
    config = config if isinstance(config, dict) else {}
    limits = [v for v in (spec.max_seq_length, config.get("max_position_embeddings")) if v]
    if not limits:
        raise ConfigError(f"model {spec.name}: set max_seq_length in models.yaml")
    max_len = int(min(limits))
    what = f"LLM reranker ({judge.yes!r} against {judge.no!r}), max_seq_length={max_len}"
    log_loaded(spec, path, device, dtype, what)
    return LoadedModel(
        path=path,
        backend=JudgeBackend(decoder, yes_no, device, dtype),
        tokenizer=tokenizer,
        max_seq_length=max_len,
        pad_token_id=pad_token_id_of(path, tokenizer, config) or 0,
        pooling="judge",
        score_activation="sigmoid",
    )

"""The set of loaded models, chosen per request by served name or Hugging Face id."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from embedsvc.backends.base import load_model
from embedsvc.engine.compute import compute_thread
from embedsvc.engine.engine import ModelEngine
from embedsvc.errors import ConfigError, ModelNotFoundError
from embedsvc.metrics import Metrics
from embedsvc.model_files import check_model_dir, resolve_model_dir
from embedsvc.registry import ModelSpec
from embedsvc.settings import Settings

log = logging.getLogger(__name__)


class EngineSet:
    def __init__(self, engines: list[ModelEngine]) -> None:
        if not engines:
            raise ConfigError("no models to serve")
        self.engines = {e.name: e for e in engines}
        self._aliases = {e.spec.hf_id: e for e in engines}
        self.default = engines[0]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.engines.values())

    def __len__(self) -> int:
        return len(self.engines)

    def get(self, name: str | None) -> ModelEngine:
        if name is None or name == "":
            return self.default
        engine = self.engines.get(name) or self._aliases.get(name)
        if engine is None:
            known = ", ".join(sorted(self.engines))
            raise ModelNotFoundError(
                f"model {name!r} is not served here; loaded models: {known}", param="model"
            )
        return engine

    @property
    def ready(self) -> bool:
        return all(e.ready and e.healthy for e in self.engines.values())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        for e in self.engines.values():
            e.start(loop)

    def stop(self) -> None:
        for e in self.engines.values():
            e.stop()


def load_engines(
    specs: list[ModelSpec],
    settings: Settings,
    metrics: Metrics,
    on_fatal: Callable[[str], None] | None = None,
) -> EngineSet:
    """Resolve, check, load and warm each model. Any failure stops start-up.

    `on_fatal(reason)` is called if an engine's worker dies later on."""
    engines = []
    for spec in specs:
        path = resolve_model_dir(spec)
        check_model_dir(spec, path)
        # Load on the compute thread, where every forward pass will run (compute.py).
        model = compute_thread().call(functools.partial(load_model, spec, path))
        engine = ModelEngine(model, settings, metrics)
        engine.on_fatal = on_fatal
        engine.warmup()
        engines.append(engine)
    return EngineSet(engines)

"""The set of served models, chosen per request by served name or Hugging Face id, and
loading them into this process."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator
from typing import cast

from embedsvc.backends.loaders import load_model
from embedsvc.engine.compute import compute_thread, cpu_lanes
from embedsvc.engine.core import CoreLink, LocalCore
from embedsvc.engine.engine import ModelEngine
from embedsvc.engine.frontend import Frontend
from embedsvc.engine.types import ModelInfo
from embedsvc.engine.worker import ModelWorker
from embedsvc.errors import ConfigError, ModelNotFoundError
from embedsvc.metrics import Metrics
from embedsvc.model_files import check_model_dir, resolve_model_dir, verify_model_files
from embedsvc.registry import Dtype, ModelSpec
from embedsvc.settings import Settings

log = logging.getLogger(__name__)


class EngineSet:
    """The front end's view of every served model, over one link to the engine core."""

    def __init__(
        self, infos: list[ModelInfo], link: CoreLink, settings: Settings, metrics: Metrics
    ) -> None:
        if not infos:
            raise ConfigError("no models to serve")
        self.front = Frontend(link, metrics, settings.tokenization_workers)
        engines = [ModelEngine(i, settings, self.front) for i in infos]
        self.engines = {e.name: e for e in engines}
        self._aliases = {e.spec.hf_id: e for e in engines}
        self.default = engines[0]
        self._first: dict[str, ModelEngine] = {}  # task -> the first model loaded for it
        for e in reversed(engines):
            self._first[e.spec.task] = e
            if e.spec.lexical_weights:
                self._first.setdefault("sparse", e)
            if e.spec.multivector:
                self._first["multivector"] = e

    def __iter__(self) -> Iterator[ModelEngine]:
        return iter(self.engines.values())

    def __len__(self) -> int:
        return len(self.engines)

    def get(self, name: str | None, task: str = "embed") -> ModelEngine:
        """The model `name` (served name or Hugging Face id), or when none is named the first
        one loaded for `task` (the first of all if none is: its task check then says so)."""
        if name is None or name == "":
            return self._first.get(task, self.default)
        engine = self.engines.get(name) or self._aliases.get(name)
        if engine is None:
            known = ", ".join(sorted(self.engines))
            raise ModelNotFoundError(
                f"model {name!r} is not served here; loaded models: {known}", param="model"
            )
        return engine

    @property
    def ready(self) -> bool:
        return all(e.healthy for e in self.engines.values())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.front.attach(loop)

    def stop(self) -> None:
        self.front.link.stop()
        self.front.pool.shutdown(wait=False, cancel_futures=True)


def load_workers(
    specs: list[ModelSpec],
    settings: Settings,
    metrics: Metrics,
    on_fatal: Callable[[str], None] | None = None,
) -> dict[str, ModelWorker]:
    """Resolve, check, load and warm each model. Any failure stops start-up.

    `on_fatal(reason)` is called if a worker dies later on."""
    workers = {}
    # Every model's files first, then the loading: a file that differs from the lock is
    # named before the first model spends its time loading and warming up.
    checked = []
    for spec in specs:
        path = resolve_model_dir(spec)
        check_model_dir(spec, path)
        checked.append((spec, path, verify_model_files(spec, path)))
    for spec, path, verified in checked:
        if settings.dtype:  # --dtype: every model at this dtype
            spec = dataclasses.replace(spec, dtype=cast(Dtype, settings.dtype))
        # Load on the compute thread, where every forward pass will run (compute.py).
        model = compute_thread().call(
            functools.partial(load_model, spec, path, settings.cpu_threads(), settings.cuda_graphs)
        )
        worker = ModelWorker(spec, model, settings, metrics)
        worker.files_verified = verified
        worker.on_fatal = on_fatal
        worker.warmup()
        workers[spec.name] = worker
    if all(w.one_thread_enough for w in workers.values()):
        # No model gains from intra-op threads: run them on one, so the cores stay free
        # for the front end (forward passes all run on the compute thread).
        first = next(iter(workers.values())).model.backend
        compute_thread().call(lambda: first.cpu_threads(1))
        log.info("forward passes run on one CPU thread (the models gain nothing from more)")
    elif all(_cpu_torch(w) for w in workers.values()):
        # Passes side by side under a backlog (compute.Lanes). Only where every model runs
        # torch on the CPU: torch's threads can be set per pass, onnxruntime's cannot.
        lanes = cpu_lanes(settings.cpu_threads())
        if lanes is not None:
            for w in workers.values():
                if not w.one_thread_enough:
                    w.use_lanes(lanes)
            log.info(
                "forward passes: up to %d side by side under a backlog, %d CPU threads each",
                len(lanes.threads),
                lanes.per_lane,
            )
    return workers


def _cpu_torch(w: ModelWorker) -> bool:
    backend = w.model.backend
    return backend.device == "cpu" and backend.per_pass_threads


def load_engines(
    specs: list[ModelSpec],
    settings: Settings,
    metrics: Metrics,
    on_fatal: Callable[[str], None] | None = None,
) -> EngineSet:
    """Load the models into this process, with the front end beside them."""
    workers = load_workers(specs, settings, metrics, on_fatal)
    infos = [w.info() for w in workers.values()]
    return EngineSet(infos, LocalCore(workers), settings, metrics)

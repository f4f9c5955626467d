"""Fan-out maps: how work inside one build (candidate scoring, eval chunks) spreads over the active executor."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]
RETRIES = 3  # like Ray's default max_retries: a unit runs at most 4 times when its worker dies
RAY_MISSING = "--executor ray needs Ray: install edgepipe[ray] (pip install 'edgepipe[ray]')"


# ---------------------------------------------------------------- fan-out maps (work inside one build)


def local_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """The in-process map: a plain loop (the default everywhere)."""
    return [fn(item) for item in items]


local_map.width = 1  # type: ignore[attr-defined]


class ProcessMap:
    """map over a local spawn-context process pool; ``fn`` and items must pickle."""

    def __init__(self, jobs: int) -> None:
        self.width = jobs

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        import multiprocessing

        if self.width <= 1 or len(items) < 2:
            return local_map(fn, items)
        with ProcessPoolExecutor(min(self.width, len(items)), mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(fn, items))


class RayMap:
    """map on Ray: one task per item; ``fn`` goes to the object store once, so big constants ride in it."""

    def __init__(self, num_cpus: float = 1) -> None:
        self.num_cpus = num_cpus

    @property
    def width(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1) // self.num_cpus))

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        import ray

        if not items:
            return []
        fn_ref = ray.put(fn)
        task = ray.remote(num_cpus=self.num_cpus, max_retries=RETRIES)(_apply)
        return ray.get([task.remote(fn_ref, item) for item in items])


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


_CURRENT: contextvars.ContextVar[Mapper] = contextvars.ContextVar("edgepipe_map", default=local_map)


def current_map() -> Mapper:
    """The map the running build fans out with (``local_map`` unless a unit runner set another)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(mapper: Mapper) -> Iterator[Mapper]:
    """Make ``mapper`` the fan-out map of builds run inside the block."""
    token = _CURRENT.set(mapper)
    try:
        yield mapper
    finally:
        _CURRENT.reset(token)


def evaluate_batches(runner: Any, model_path: Path, batches: list, providers: list[str], session_config: dict[str, str]) -> dict:
    """The artifact's outputs over the eval batches: in-process, or split in contiguous chunks over the map.

    The first batch runs here and times the rest: fanning out pays only when the remaining work exceeds
    ``EDGEPIPE_FANOUT_MIN_SECONDS`` (default 2 s; a task that loads the model costs about a second).
    Chunks are concatenated in order, so the result equals the in-process one.
    """
    from edgepipe.core.runtime import concat, run_batches

    mapper = current_map()
    width = int(getattr(mapper, "width", 1))
    if width <= 1 or len(batches) < 3:
        return run_batches(runner, batches)
    start = time.perf_counter()
    first, rest = run_batches(runner, batches[:1]), batches[1:]
    if (time.perf_counter() - start) * len(rest) < float(os.environ.get("EDGEPIPE_FANOUT_MIN_SECONDS", 2.0)):
        return concat([first, run_batches(runner, rest)])
    blob = {p.name: p.read_bytes() for p in sorted(model_path.parent.glob(model_path.name + "*")) if p.is_file()}
    n = min(len(rest), width)
    bounds = [len(rest) * i // n for i in range(n + 1)]
    chunks = [rest[bounds[i] : bounds[i + 1]] for i in range(n)]
    return concat([first, *mapper(functools.partial(_eval_chunk, model_path.name, blob, providers, session_config), chunks)])


def _eval_chunk(model_file: str, blob: dict[str, bytes], providers: list[str], session_config: dict[str, str], chunk: list) -> dict:
    from edgepipe.core.runtime import Runner, run_batches

    with tempfile.TemporaryDirectory(prefix="edgepipe-eval-") as tmp:
        for name, data in blob.items():  # the model with its external data, if any
            (Path(tmp) / name).write_bytes(data)
        runner = Runner(Path(tmp) / model_file, providers=providers, threads=1, session_config=session_config)
        return run_batches(runner, chunk)

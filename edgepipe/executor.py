"""Executors: (recipe, target) build units in-process, in a process pool or as Ray tasks; fan-out maps."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from edgepipe.errors import BadInput, EdgepipeError, one_line

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
    from edgepipe.accuracy import concat
    from edgepipe.build import run_batches

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
    from edgepipe.build import run_batches
    from edgepipe.runtime import Runner

    with tempfile.TemporaryDirectory(prefix="edgepipe-eval-") as tmp:
        for name, data in blob.items():  # the model with its external data, if any
            (Path(tmp) / name).write_bytes(data)
        runner = Runner(Path(tmp) / model_file, providers=providers, threads=1, session_config=session_config)
        return run_batches(runner, chunk)


# ---------------------------------------------------------------- build units


@dataclasses.dataclass(frozen=True)
class Unit:
    """One (recipe, target) build; ``fanout='ray'`` fans its evaluation out as Ray tasks."""

    recipe: str  # absolute path of the recipe file
    name: str
    target: str
    fanout: str = "local"


@dataclasses.dataclass
class UnitResult:
    """What a worker sends back: status, manifest and the artifact's files (the driver publishes them)."""

    recipe: str
    name: str
    target: str
    status: str  # passed | failed (a check failed, nothing published) | error (the build raised or its worker died)
    error: str | None = None
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    log: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    where: str = ""  # host:pid that ran it
    attempts: int = 1
    folder: Path | None = None  # set by the driver once published

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def scratch_root() -> Path:
    """Host-local folder where workers build before sending the artifact back (``EDGEPIPE_SCRATCH`` moves it)."""
    return Path(os.environ.get("EDGEPIPE_SCRATCH") or tempfile.gettempdir()) / "edgepipe-units"


def run_unit(unit: Unit) -> UnitResult:
    """Build one target in a private scratch folder; never raises for a build problem (the result says it)."""
    from edgepipe.artifact import remove_stale
    from edgepipe.build import build
    from edgepipe.recipe import load_recipe

    start = time.perf_counter()
    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)  # what killed workers on this host left behind
    work = _work_folder(root)
    result = UnitResult(unit.recipe, unit.name, unit.target, "error", where=f"{socket.gethostname()}:{os.getpid()}")
    try:
        if unit.fanout == "ray":
            _host_threads()
        recipe = load_recipe(unit.recipe)
        with using(RayMap() if unit.fanout == "ray" else local_map):
            (built,) = build(recipe, work, only=[unit.target], log=result.log.append)
        result.manifest = built.manifest
        if built.passed and built.folder is not None:
            result.status = "passed"
            result.files = {p.relative_to(built.folder).as_posix(): p.read_bytes() for p in sorted(built.folder.rglob("*")) if p.is_file()}
        else:
            result.status, result.error = "failed", built.error
    except EdgepipeError as exc:
        result.error = str(exc)
    except Exception as exc:  # a bug in edgepipe or in user code: reported, the other units go on
        result.error = f"internal error: {type(exc).__name__}: {one_line(str(exc))[:300]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _work_folder(root: Path) -> Path:
    """A private folder under ``root``; a driver finishing at the same moment may remove ``root`` when empty."""
    for _ in range(3):
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            return Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))
    return Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))


def _host_threads() -> None:
    """Ray sets OMP_NUM_THREADS=1 in its workers; torch's float sums depend on its thread count, so the
    reference outputs (golden, export check) would differ in the last bits from a local build. Give torch
    the threads a local run on this host gets."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))


def _died(unit: Unit, attempts: int, why: str) -> UnitResult:
    return UnitResult(unit.recipe, unit.name, unit.target, "error", error=f"worker died {attempts}× ({why}); gave up", attempts=attempts)


Done = Callable[[UnitResult], None]


def run_units(units: list[Unit], executor: str = "local", jobs: int = 1, address: str | None = None,
              retries: int = RETRIES, on_done: Done | None = None) -> list[UnitResult]:
    """Run every unit; results in the order of ``units``. One unit failing never stops the others."""
    from edgepipe.artifact import remove_stale

    done = on_done or (lambda r: None)
    if executor == "ray":
        results = _run_ray(units, address, jobs, retries, done)
    elif jobs > 1 and len(units) > 1:
        results = _run_pool(units, jobs, retries, done)
    else:
        results = []
        for unit in units:
            results.append(run_unit(unit))
            done(results[-1])
    remove_stale(scratch_root())  # a worker killed on its last attempt left its scratch (on this host) behind
    with contextlib.suppress(OSError):
        scratch_root().rmdir()  # only when empty: no edgepipe folder stays in the system temp folder
    return results


def _run_pool(units: list[Unit], jobs: int, retries: int, done: Done) -> list[UnitResult]:
    """A spawn process pool; a dead worker breaks the pool, so its running units are resubmitted to a new one."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    pending = collections.deque(range(len(units)))
    attempts = [0] * len(units)
    results: list[UnitResult | None] = [None] * len(units)
    while pending:
        broken: list[int] = []
        with ProcessPoolExecutor(min(jobs, len(pending)), mp_context=ctx) as pool:
            running: dict[Any, int] = {}
            while pending or running:
                # Only as many units in flight as workers: a broken pool then names exactly the units that were running.
                while pending and len(running) < jobs and not broken:
                    i = pending.popleft()
                    attempts[i] += 1
                    running[pool.submit(run_unit, units[i])] = i
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = running.pop(future)
                    try:
                        results[i] = dataclasses.replace(future.result(), attempts=attempts[i])
                        done(results[i])
                    except BrokenProcessPool:
                        broken.append(i)
        for i in broken:
            if attempts[i] <= retries:
                pending.appendleft(i)
            else:
                results[i] = _died(units[i], attempts[i], "the process pool broke")
                done(results[i])
    return [r for r in results if r is not None]


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput(RAY_MISSING) from None
    return ray


def _run_ray(units: list[Unit], address: str | None, jobs: int, retries: int, done: Done) -> list[UnitResult]:
    """Each unit a Ray task (``max_retries``: Ray reruns it when its worker dies); its evaluation fans out too."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            if address:  # an existing cluster: it has its own resources and dashboard settings
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(address="local", num_cpus=jobs, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            hint = "; check the address (auto, HOST:6379 or ray://HEAD:10001) and, for a cluster with token auth, set RAY_AUTH_MODE=token and its token" if address else ""
            raise BadInput(f"cannot start or reach Ray at {address or 'local'}: {one_line(str(exc))[:300]}{hint}") from None
    try:
        # Retried here, not with Ray's max_retries: Ray's own retries are invisible to the result (attempts=1).
        task = ray.remote(num_cpus=1, max_retries=0)(run_unit)
        attempts = [1] * len(units)
        refs = {task.remote(dataclasses.replace(u, fanout="ray")): i for i, u in enumerate(units)}
        results: list[UnitResult | None] = [None] * len(units)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                i = refs.pop(ref)
                try:
                    results[i] = dataclasses.replace(ray.get(ref), attempts=attempts[i])
                except ray.exceptions.RayError as exc:  # run_unit never raises: the worker (or its node) died
                    if attempts[i] <= retries:
                        attempts[i] += 1
                        refs[task.remote(dataclasses.replace(units[i], fanout="ray"))] = i
                        continue
                    results[i] = _died(units[i], attempts[i], one_line(str(exc)).split(". ")[0][:200])
                done(results[i])
        return [r for r in results if r is not None]
    finally:
        if started:
            ray.shutdown()

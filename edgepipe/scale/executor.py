"""Executors: run the planned (recipe, target) units in-process, in child processes, or as Ray tasks.

Every executor returns the same ``TargetResult`` per unit, published under OUT, and applies the same rule:
a unit that fails or whose process dies is that unit's result (with its reason); the others still build.

- ``local`` (default): child processes (a forkserver, so torch is imported once). With ``--jobs 1`` one child
  per recipe builds its targets (one export per recipe); with ``--jobs N``, up to N children, one per unit.
  A child that dies (a native crash: SIGSEGV, the OOM killer) costs only the target it was building: that
  target is retried ``retries`` times, then reported as ``crashed: SIGSEGV``; its other targets go on in a
  new child.
- ``inprocess``: the same builds in this process (no isolation; what the Python API uses).
- ``ray``: one Ray task per unit; workers send the artifact's files back and the driver publishes them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepipe.core.artifact import ensure_replaceable, hash_tree, remove_stale, staging
from edgepipe.core.artifact import publish as publish_folder
from edgepipe.core.errors import BadInput, CheckFailed, classify, one_line
from edgepipe.core.fanout import RAY_MISSING, RETRIES, RayMap, local_map, using
from edgepipe.core.result import CRASHED, ERROR, PASSED, TargetResult
from edgepipe.pipeline.build import build, failure

EXECUTORS = ("local", "inprocess", "ray")
# Imported once, in the forkserver, rather than in every child: the build, and torch's ONNX exporter (dynamo,
# torch.export, onnxscript's torchlib), which the build imports on its first export: only when a unit exports
# (an ONNX source needs no torch; ~2 CPU-s saved). A name this torch lacks is skipped.
PRELOAD = ["edgepipe.pipeline.build"]
EXPORTER = ["torch.onnx._internal.exporter._core", "torch.export._trace", "torch._dynamo",
            "onnxscript.function_libs.torch_lib.ops"]
Done = Callable[[TargetResult], None]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One (recipe, target) build."""

    recipe: str  # absolute path of the recipe file
    name: str
    target: str
    fanout: str = "local"  # ray: the unit's evaluation fans out as Ray tasks
    exports: bool = True  # its model comes from torch / Hugging Face (exported), not from an ONNX file


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to build and where: the units (checked before anything runs) and the output folder."""

    units: tuple[Unit, ...]
    out: Path
    force: bool = False


def run_units(plan: Plan, executor: str = "local", jobs: int = 1, address: str | None = None,
              retries: int = RETRIES, on_done: Done | None = None, log_stream: str | None = None) -> list[TargetResult]:
    """Run every unit; results in the order of ``plan.units``, each published when it passed.

    ``log_stream`` ("stdout" / "stderr" / None): where a child process prints its progress lines.
    """
    done = on_done or (lambda r: None)
    if executor == "ray":
        results = _run_ray(plan, address, jobs, retries, done)
    elif executor == "inprocess":
        results = _run_inprocess(plan, done)
    else:
        results = _run_children(plan, jobs, retries, done, log_stream)
    order = {(u.name, u.target): i for i, u in enumerate(plan.units)}
    return sorted(results, key=lambda r: order[(r.name, r.target)])


def _groups(units: tuple[Unit, ...], per_recipe: bool) -> list[list[Unit]]:
    if not per_recipe:
        return [[u] for u in units]
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.recipe, []).append(u)
    return list(groups.values())


def _build_group(units: list[Unit], out: Path, force: bool, on_start: Callable[[str], None] | None, on_done: Done) -> None:
    """Build one recipe's units here; every unit gets a result, whatever goes wrong."""
    from edgepipe.recipe import load_recipe

    def finish(r: TargetResult) -> None:
        on_done(dataclasses.replace(r, recipe=units[0].recipe))

    try:
        recipe = load_recipe(units[0].recipe)
        build(recipe, out, only=[u.target for u in units], force=force, on_start=on_start, on_done=finish)
    except Exception as exc:  # the recipe changed since the plan, or a target name vanished
        for u in units:
            finish(failure(u.name, u.target, exc))


def _run_inprocess(plan: Plan, done: Done) -> list[TargetResult]:
    results: list[TargetResult] = []

    def finish(r: TargetResult) -> None:
        results.append(r)
        done(r)

    for group in _groups(plan.units, per_recipe=True):
        _build_group(group, plan.out, plan.force, None, finish)
    return results


# ---------------------------------------------------------------- child processes


def _child(conn: Any, lifeline: Any, units: list[Unit], out: str, force: bool, env: dict[str, str], cwd: str,
           log_stream: str | None) -> None:
    """In the child: this process's environment is the parent's now (a forkserver child inherits the server's)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    _die_with_driver(lifeline)
    log = logging.getLogger("edgepipe")
    if log_stream:
        handler = logging.StreamHandler(sys.stderr if log_stream == "stderr" else sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # a library may have configured the root logger in the server: print once
    try:
        _build_group(units, Path(out), force, lambda t: conn.send(("start", t)), lambda r: conn.send(("done", r)))
    except KeyboardInterrupt:  # the driver was interrupted and stopped us; staging and scratch are cleaned by now
        sys.exit(130)
    finally:
        conn.close()


def _die_with_driver(lifeline: Any) -> None:
    """The driver holds the other end of ``lifeline``; if it is killed, the kernel closes it and this child stops
    at once, before it publishes anything (its scratch is swept by the next build, as for the driver's)."""
    import threading

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="edgepipe-lifeline").start()


def _stop(running: dict[Any, _Running], out: Path) -> None:
    """Interrupted: the children stop too (SIGINT: each cleans its staging folder), nothing more is published."""
    for child in running.values():
        if child.proc.is_alive():
            os.kill(child.proc.pid, signal.SIGINT)
    for child in running.values():
        child.proc.join(30)
        if child.proc.is_alive():
            child.proc.kill()
            child.proc.join()
    for child in running.values():
        shutil.rmtree(child.scratch, ignore_errors=True)


def _publish_local(result: TargetResult, plan: Plan) -> TargetResult:
    """Move a child's passed artifact from its scratch into OUT (atomically; the old one stays whole until then)."""
    if not result.passed or result.folder is None:
        return result
    final = plan.out / result.name / result.target
    try:
        ensure_replaceable(final, plan.force)
        publish_folder(result.folder, final)
    except (BadInput, OSError) as exc:
        code, why = classify(exc)
        return dataclasses.replace(result, status=ERROR, error=f"publish failed: {why}", exit_code=code, folder=None)
    return dataclasses.replace(result, folder=final)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"crashed: {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"crashed: signal {-exitcode}"
    return f"crashed: its process exited with code {exitcode} before reporting"


@dataclasses.dataclass
class _Running:
    proc: Any
    units: list[Unit]
    lifeline: Any  # our end of the child's lifeline: closed when the child is done (or we die)
    scratch: Path  # where the child builds; we publish from there
    finished: set[str] = dataclasses.field(default_factory=set)
    current: Unit | None = None


def _run_children(plan: Plan, jobs: int, retries: int, done: Done, log_stream: str | None) -> list[TargetResult]:
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    # Before the server starts (the first build of this process): a later build reuses the server as it is.
    ctx.set_forkserver_preload([*PRELOAD, *(EXPORTER if any(u.exports for u in plan.units) else [])])
    queue = collections.deque(_groups(plan.units, per_recipe=jobs <= 1))
    attempts: collections.Counter[Unit] = collections.Counter()
    results: list[TargetResult] = []
    running: dict[Any, _Running] = {}

    def finish(r: TargetResult) -> None:
        results.append(r)
        done(r)

    try:
        _loop(ctx, plan, queue, running, attempts, jobs, retries, finish, log_stream)
    except BaseException:  # Ctrl-C (or a bug here): no child goes on building behind the user's back
        _stop(running, plan.out)
        raise
    return results


def _loop(ctx: Any, plan: Plan, queue: collections.deque, running: dict[Any, _Running], attempts: collections.Counter,
          jobs: int, retries: int, finish: Done, log_stream: str | None) -> None:
    from multiprocessing.connection import wait

    while queue or running:
        while queue and len(running) < max(1, jobs):
            units = queue.popleft()
            # The child builds in a scratch folder of ours and we publish: a killed driver publishes nothing.
            (plan.out / units[0].name).mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=plan.out / units[0].name))
            recv, send = ctx.Pipe(duplex=False)
            life_r, life_w = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(send, life_r, units, str(scratch), True, dict(os.environ), os.getcwd(), log_stream))
            proc.start()
            send.close()
            life_r.close()
            running[recv] = _Running(proc, units, life_w, scratch)
        for conn in wait(list(running)):
            child = running[conn]
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                del running[conn]
                conn.close()
                child.proc.join()
                child.lifeline.close()
                shutil.rmtree(child.scratch, ignore_errors=True)
                queue.extendleft(reversed(_after_death(child, attempts, retries, finish)))
                continue
            if kind == "start":
                child.current = next(u for u in child.units if u.target == payload)
                attempts[child.current] += 1
            else:
                unit = next(u for u in child.units if u.target == payload.target)
                child.finished.add(unit.target)
                finish(_publish_local(dataclasses.replace(payload, attempts=max(1, attempts[unit])), plan))


def _after_death(child: _Running, attempts: collections.Counter, retries: int, finish: Done) -> list[list[Unit]]:
    """A child died: the unit it was building is retried or reported crashed; the rest run in a new child."""
    left = [u for u in child.units if u.target not in child.finished]
    if not left:
        return []
    why = _death(child.proc.exitcode)
    hit = [child.current] if child.current in left else left  # died outside a target (export): all of them
    if child.current not in left:
        for u in hit:
            attempts[u] += 1
    if attempts[hit[0]] <= retries:
        return [left]
    for u in hit:
        n = attempts[u]
        finish(TargetResult(u.name, u.target, CRASHED, why + (f" ({n} attempts)" if n > 1 else ""), 1, recipe=u.recipe, attempts=n))
    rest = [u for u in left if u not in hit]
    return [rest] if rest else []


# ---------------------------------------------------------------- Ray


def scratch_root() -> Path:
    """Host-local folder where Ray workers build before sending the artifact back (``EDGEPIPE_SCRATCH`` moves it)."""
    return Path(os.environ.get("EDGEPIPE_SCRATCH") or tempfile.gettempdir()) / "edgepipe-units"


def run_unit(unit: Unit) -> TargetResult:
    """Build one target in a private scratch folder and return its files; never raises for a build problem."""
    from edgepipe.recipe import load_recipe

    root = scratch_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)  # what killed workers on this host left behind
    work = _work_folder(root)
    try:
        if unit.fanout == "ray":
            _host_threads()
        try:
            with using(RayMap() if unit.fanout == "ray" else local_map):
                (result,) = build(load_recipe(unit.recipe), work, only=[unit.target])
        except Exception as exc:
            result = failure(unit.name, unit.target, exc)
        if result.passed and result.folder is not None:
            files = {p.relative_to(result.folder).as_posix(): p.read_bytes() for p in sorted(result.folder.rglob("*")) if p.is_file()}
            result = dataclasses.replace(result, files=files, folder=None)
        return dataclasses.replace(result, recipe=unit.recipe, where=f"{socket.gethostname()}:{os.getpid()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty (the last unit on this host): no edgepipe folder stays in the system temp folder


def _work_folder(root: Path) -> Path:
    """A private folder under ``root``; a driver finishing at the same moment may remove ``root`` when empty."""
    for _ in range(3):
        root.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            return Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))
    return Path(tempfile.mkdtemp(prefix=f".work-{os.getpid()}-", dir=root))


def publish(result: TargetResult, out: Path, force: bool) -> TargetResult:
    """Write a remote worker's artifact atomically under OUT; the files must hash to what its manifest says."""
    if not result.passed:
        return result
    final = out / result.name / result.target
    try:
        with staging(final, force) as tmp:
            for rel, data in result.files.items():
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if hash_tree(tmp) != result.manifest.get("files"):
                raise CheckFailed(f"{result.name}/{result.target}: files from the worker do not match its manifest; rebuild")
    except (BadInput, CheckFailed, OSError) as exc:
        return dataclasses.replace(result, status=ERROR, error=f"publish failed: {exc}", exit_code=2, files={})
    return dataclasses.replace(result, folder=final, files={})


def _host_threads() -> None:
    """Ray sets OMP_NUM_THREADS=1 in its workers; torch's float sums depend on its thread count, so the
    reference outputs (golden, export check) would differ in the last bits from a local build. Give torch
    the threads a local run on this host gets."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput(RAY_MISSING) from None
    return ray


def _run_ray(plan: Plan, address: str | None, jobs: int, retries: int, done: Done) -> list[TargetResult]:
    """Each unit a Ray task (rerun here, up to ``retries`` times, when its worker dies); its evaluation fans out too."""
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
        start = time.perf_counter()
        attempts: collections.Counter[Unit] = collections.Counter()
        refs = {task.remote(dataclasses.replace(u, fanout="ray")): u for u in plan.units}
        attempts.update(plan.units)
        results = []
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                u = refs.pop(ref)
                try:
                    result = publish(dataclasses.replace(ray.get(ref), attempts=attempts[u]), plan.out, plan.force)
                except ray.exceptions.RayError as exc:  # run_unit never raises: the worker (or its node) died
                    if attempts[u] <= retries:
                        attempts[u] += 1
                        refs[task.remote(dataclasses.replace(u, fanout="ray"))] = u
                        continue
                    why = one_line(str(exc)).split(". ")[0][:200]
                    result = TargetResult(u.name, u.target, CRASHED, f"crashed: worker died {attempts[u]}× ({why}); gave up", 1,
                                          recipe=u.recipe, attempts=attempts[u], seconds=round(time.perf_counter() - start, 2))
                results.append(result)
                done(result)
        remove_stale(scratch_root())  # a worker killed on its last attempt left its scratch (on this host) behind
        with contextlib.suppress(OSError):
            scratch_root().rmdir()  # only when empty: no edgepipe folder stays in the system temp folder
        return results
    finally:
        if started:
            ray.shutdown()


__all__ = ["EXECUTORS", "PASSED", "Plan", "Unit", "import_ray", "publish", "run_unit", "run_units", "scratch_root"]

"""`edgepipe build`: plan (recipe, target) units, run them on an executor, publish, report: one path for every run."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from edgepipe.core.errors import BadInput, EdgepipeError, one_line
from edgepipe.core.manifest import Manifest, ModelEntry
from edgepipe.core.result import ERROR, TargetResult, as_json, as_json_refused, exit_code

logger = logging.getLogger(__name__)


def plan(recipes: list[str], out: Path, only: list[str] | None, force: bool):
    """Every check that needs no build, before anything starts (bad input → exit 2); one unit per (recipe, target)."""
    from edgepipe.pipeline.build import preflight
    from edgepipe.recipe import load_recipe
    from edgepipe.scale.executor import Plan, Unit

    units, names = [], {}
    for path in recipes:
        recipe = load_recipe(path)
        if recipe.name in names:
            raise BadInput(f"recipes {names[recipe.name]} and {path} both have name '{recipe.name}'; give each a unique name")
        names[recipe.name] = path
        pre = preflight(recipe, out, only, force)  # targets, existing artifacts, data, output folder
        exports = recipe.model.kind != "onnx"
        units += [Unit(str(Path(path).resolve()), recipe.name, target, exports=exports) for target in pre.targets]
    return Plan(tuple(units), out, force)


def cmd_build(args: argparse.Namespace) -> int:
    from edgepipe.cli.sign import build_signer
    from edgepipe.scale.executor import import_ray, run_units

    out = Path(args.output)
    only = [t.strip() for t in args.target.split(",") if t.strip()] if args.target else None
    try:
        if args.address and args.executor != "ray":
            raise BadInput("--address needs --executor ray")
        if args.executor == "ray":
            import_ray()  # missing Ray is bad input, before any work
        signer = build_signer(args)  # a bad key is exit 2 before any work (a dry run included)
        if args.dry_run:
            return _dry_run(args.recipe, out, only, args.force)
        units = plan(args.recipe, out, only, args.force)
    except EdgepipeError as exc:
        if args.json and not args.dry_run:  # refused before any unit ran: still the one document on stdout
            print(json.dumps(as_json_refused(exc.exit_code, one_line(str(exc))), indent=2))
        raise
    stream = sys.stderr if args.json else sys.stdout  # with --json, stdout carries only the JSON summary
    where = {"ray": f"ray ({args.address or 'local'})", "inprocess": "in-process"}.get(
        args.executor, f"{args.jobs} child processes" if args.jobs > 1 else "a child process per recipe")
    n = len(units.units)
    recipes = len({u.name for u in units.units})
    _say(stream, args.quiet, f"build   {n} unit{'s' * (n != 1)} ({recipes} recipe{'s' * (recipes != 1)}) on {where}")
    count = [0]

    def on_done(r: TargetResult) -> None:
        count[0] += 1
        tries = f", {r.attempts} attempts" if r.attempts > 1 else ""
        _say(stream, args.quiet, f"[{count[0]}/{n}] {r.name}/{r.target} {r.status} in {r.seconds:.1f}s{tries}"
                                 f"{' on ' + r.where if r.where else ''}{': ' + r.error if r.error else ''}")

    with _progress(args.quiet, stream, args.executor == "inprocess"):
        results = run_units(units, args.executor, args.jobs, args.address, args.retries, on_done,
                            log_stream=None if args.quiet else ("stderr" if args.json else "stdout"))
    reports, archives = finish(results, out, args.archive, signer)
    if args.json:
        print(json.dumps(as_json(results, reports, archives), indent=2))
    else:
        _table(results, args.executor)
        for name, path in reports.items():
            print(f"report ({name}): {path}")
        for (name, target), path in archives.items():
            print(f"archive ({name}/{target}): {path}")
    _errors(results, args.debug)
    return exit_code(results)


def _say(stream: TextIO, quiet: bool, line: str) -> None:
    if not quiet:
        print(line, file=stream, flush=True)


@contextlib.contextmanager
def _progress(quiet: bool, stream: TextIO, active: bool) -> Iterator[None]:
    """Route an in-process build's log lines (the edgepipe.* loggers) to a Progress for the block; restore after."""
    if quiet or not active:
        yield
        return
    from edgepipe.core.progress import Progress, ProgressHandler

    progress = Progress(stream=stream)
    with ProgressHandler.installed(progress):
        try:
            yield
        finally:
            progress.close()


def finish(results: list[TargetResult], out: Path, archive: bool, signer=None) -> tuple[dict, dict]:
    """Signatures (with a signer), reports (a recipe with at least one checked model) and archives of published artifacts."""
    from edgepipe.core.archive import pack
    from edgepipe.core.artifact import remove_stale
    from edgepipe.core.sign import sign_published
    from edgepipe.pipeline.report import write_report

    sign_published([r.folder for r in results], signer)  # before any archive is packed: the archive carries model.sig

    reports, archives = {}, {}
    for name in dict.fromkeys(r.name for r in results):
        mine = [r for r in results if r.name == name]
        if (out / name).is_dir():
            remove_stale(out / name)
        if any(r.manifest for r in mine):
            reports[name] = write_report(out / name, name, mine)
    if archive:
        for r in results:
            if r.folder is not None:
                archives[(r.name, r.target)] = pack(r.folder, r.folder.parent / f"{r.name}-{r.target}.tar.gz")
    return reports, archives


def _errors(results: list[TargetResult], debug: bool) -> None:
    """One line on stderr per distinct error (a raised check, bad input, internal error); a traceback with --debug."""
    seen = set()
    for r in results:
        if r.status != ERROR or r.error in seen:
            continue
        seen.add(r.error)
        if debug and r.traceback:
            print(r.traceback, file=sys.stderr)
        if r.exit_code == 3:
            print(f"edgepipe: internal error: {one_line(r.error or '')} (rerun with --debug for the traceback)", file=sys.stderr)
        else:
            print(f"edgepipe: error: {one_line(r.error or '')}", file=sys.stderr)


def _dry_run(recipes: list[str], out: Path, only: list[str] | None, force: bool) -> int:
    from edgepipe.pipeline.dryrun import dry_run
    from edgepipe.recipe import load_recipe

    for path in recipes:
        for line in dry_run(load_recipe(path), out, only, force):
            print(f"ok   {line}")
    print("dry run: passed (nothing was built)")
    return 0


def _table(results: list[TargetResult], executor: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edgepipe build ({executor})")
    for col in ("recipe", "target", "status", "size (vs fp32)", "metric: fp32 → artifact", "p50 ms (b1)", "seconds", "artifact / error"):
        table.add_column(col)
    for r in results:
        entries = Manifest.from_json(r.manifest).entries if r.manifest else (ModelEntry(),)
        for i, m in enumerate(entries):
            acc, lat, size = m.accuracy, m.latency, m.size
            metric = f"{acc.metric}: {acc.reference:.4f} → {acc.value:.4f}" if "accuracy" in m.present else "-"
            status = r.status if r.passed else r.status.upper()
            table.add_row(
                r.name if i == 0 else "", r.target if i == 0 else f"  + {m.model_file}", status if i == 0 else ("passed" if acc.passed else "FAILED"),
                f"{size.model_bytes / 1024:.1f} KiB ({size.ratio:.0%})" if "size" in m.present else "-", metric,
                f"{lat.p50_ms:.3f}" if "latency" in m.present else "-", f"{r.seconds:.1f}" if i == 0 else "",
                (str(r.folder) if r.folder else (r.error or "(not written)")) if i == 0 else "",
            )
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} builds passed")


__all__ = ["cmd_build", "plan"]

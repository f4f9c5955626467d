"""edgepipe build with several recipes, --jobs or --executor ray: units out, artifacts published here, one table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgepipe.artifact import hash_tree, remove_stale, staging
from edgepipe.errors import BadInput, CheckFailed
from edgepipe.executor import Unit, UnitResult, import_ray, run_units
from edgepipe.sign import build_signer, sign_published


def plan(recipes: list[str], out: Path, only: list[str] | None, force: bool) -> list[Unit]:
    """Every check that needs no build, before anything starts (bad input → exit 2); one unit per (recipe, target)."""
    from edgepipe.build import check_writable, select_targets
    from edgepipe.recipe import load_recipe

    units, names = [], {}
    for path in recipes:
        recipe = load_recipe(path)
        if recipe.name in names:
            raise BadInput(f"recipes {names[recipe.name]} and {path} both have name '{recipe.name}'; give each a unique name")
        names[recipe.name] = path
        for target in select_targets(recipe, only):
            if (out / recipe.name / target).exists() and not force:
                raise BadInput(f"{out / recipe.name / target} already exists; pass --force to replace it or choose another -o folder")
            units.append(Unit(str(Path(path).resolve()), recipe.name, target))
    check_writable(out)
    return units


def publish(result: UnitResult, out: Path, force: bool) -> Path:
    """Write a worker's artifact atomically under OUT; the files must hash to what its manifest says."""
    final = out / result.name / result.target
    with staging(final, force) as tmp:
        for rel, data in result.files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        if hash_tree(tmp) != result.manifest.get("files"):
            raise CheckFailed(f"{result.name}/{result.target}: files from the worker do not match its manifest; rebuild")
    return final


def cmd_build_many(args: argparse.Namespace) -> int:
    from edgepipe.archive import pack
    from edgepipe.build import TargetResult
    from edgepipe.report import write_report

    if args.address and args.executor != "ray":
        raise BadInput("--address needs --executor ray")
    if args.executor == "ray":
        import_ray()  # missing Ray is bad input, before any work
    out = Path(args.output)
    only = [t.strip() for t in args.target.split(",") if t.strip()] if args.target else None
    signer = build_signer(args)  # a bad key is exit 2 before any unit starts (a dry run included)
    if args.dry_run:
        from edgepipe.dryrun import dry_run
        from edgepipe.recipe import load_recipe

        for path in args.recipe:
            for line in dry_run(load_recipe(path), out, only, args.force):
                print(f"ok   {line}")
        print("dry run: passed (nothing was built)")
        return 0
    units = plan(args.recipe, out, only, args.force)
    stream = sys.stderr if args.json else sys.stdout
    where = f"ray ({args.address or 'local'})" if args.executor == "ray" else (f"{args.jobs} local processes" if args.jobs > 1 else "in-process")
    if not args.quiet:
        recipes = len({u.name for u in units})
        print(f"build   {len(units)} unit{'s' * (len(units) != 1)} ({recipes} recipe{'s' * (recipes != 1)}) on {where}", file=stream, flush=True)
    count = [0]

    def on_done(r: UnitResult) -> None:
        count[0] += 1
        if r.passed:
            try:
                r.folder = publish(r, out, args.force)
            except (BadInput, CheckFailed, OSError) as exc:
                r.status, r.error = "error", f"publish failed: {exc}"
        if not args.quiet:
            tries = f", {r.attempts} attempts" if r.attempts > 1 else ""
            print(f"[{count[0]}/{len(units)}] {r.name}/{r.target} {r.status} in {r.seconds:.1f}s{tries}"
                  f"{' on ' + r.where if r.where else ''}{': ' + r.error if r.error else ''}", file=stream, flush=True)

    results = run_units(units, args.executor, args.jobs, args.address, args.retries, on_done)
    sign_published([r.folder for r in results], signer)
    reports, archives = {}, {}
    for name in dict.fromkeys(r.name for r in results):
        (out / name).mkdir(parents=True, exist_ok=True)
        remove_stale(out / name)
        mine = [TargetResult(r.target, r.passed, r.folder, r.manifest, r.error) for r in results if r.name == name]
        reports[name] = write_report(out / name, name, mine)
    if args.archive:
        for r in results:
            if r.folder is not None:
                archives[(r.name, r.target)] = pack(r.folder, r.folder.parent / f"{r.name}-{r.target}.tar.gz")
    if args.json:
        print(json.dumps(_json(results, reports, archives), indent=2))
    else:
        _table(results, args.executor)
        for name, path in reports.items():
            print(f"report ({name}): {path}")
    return 0 if all(r.passed for r in results) else 1


def _json(results: list[UnitResult], reports: dict, archives: dict) -> dict:
    return {
        "passed": all(r.passed for r in results),
        "reports": {k: str(v) for k, v in reports.items()},
        "units": [
            {"recipe": r.recipe, "name": r.name, "target": r.target, "status": r.status, "error": r.error,
             "folder": str(r.folder) if r.folder else None, "seconds": r.seconds, "attempts": r.attempts, "where": r.where,
             "archive": str(archives[(r.name, r.target)]) if (r.name, r.target) in archives else None,
             "accuracy": r.manifest.get("accuracy"), "content_sha256": r.manifest.get("content_sha256")}
            for r in results
        ],
    }


def _table(results: list[UnitResult], executor: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edgepipe build ({executor})")
    for col in ("recipe", "target", "status", "metric: fp32 → artifact", "seconds", "artifact / error"):
        table.add_column(col)
    for r in results:
        acc = r.manifest.get("accuracy") or {}
        metric = f"{acc['metric']}: {acc['reference']:.4f} → {acc['value']:.4f}" if acc else "-"
        table.add_row(r.name, r.target, r.status if r.passed else r.status.upper(), metric, f"{r.seconds:.1f}",
                      str(r.folder) if r.folder else (r.error or "(not written)"))
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} builds passed")

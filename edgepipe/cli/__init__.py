"""The edgepipe command line: build, verify, bench, inspect."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from edgepipe.cli import sign
from edgepipe.core.errors import BadInput, EdgepipeError, one_line

INTERNAL_ERROR = 3


def _console():
    from rich.console import Console

    # Plain, wide output when not a terminal (CI logs): no escape codes, no wrapping.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def cmd_build(args: argparse.Namespace) -> int:
    from edgepipe.cli.build import cmd_build as build_units

    return build_units(args)


def cmd_verify(args: argparse.Namespace) -> int:
    from edgepipe.api import verify
    from edgepipe.pipeline.verify import junit_xml

    folder = Path(args.artifact)
    checks = verify(folder, trust=sign.verify_trust(args)).checks
    for c in checks:
        print(f"{'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}")
    if args.junit:
        Path(args.junit).write_text(junit_xml(folder, checks), encoding="utf-8")
    ok = all(c.passed for c in checks)
    print(f"verify: {'passed' if ok else 'FAILED'} ({folder})")
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from edgepipe.core.artifact import GOLDEN, load_golden, read_manifest
    from edgepipe.core.bench import latency, peak_rss_mb, resize_batch
    from edgepipe.core.manifest import Manifest
    from edgepipe.core.runtime import Runner

    folder = Path(args.artifact)
    manifest = Manifest.from_json(read_manifest(folder))
    if manifest.is_decoder:
        from edgepipe.pipeline.decoder.replay import bench_cli

        return bench_cli(folder, manifest, args)
    runtime = manifest.primary.runtime
    runner = Runner(folder / manifest.primary.model_file, providers=runtime.providers, threads=args.threads,
                    session_config=runtime.session_config)
    inputs, _, _ = load_golden(folder / GOLDEN)
    rows = []
    sizes = [int(x) for x in args.batch.split(",")]
    fixed = runner.fixed_batch()
    if fixed is not None and any(b != fixed for b in sizes):
        raise BadInput(f"{folder} takes a fixed batch of {fixed} (its input shapes are fixed); use --batch {fixed}")
    for b in sizes:
        rows.append(latency(runner, resize_batch(inputs, b), warmup=args.warmup, runs=args.runs, max_seconds=60))
    result = {"artifact": str(folder), "load_ms": round(runner.load_seconds * 1e3, 2), "peak_rss_mb": peak_rss_mb(),
              "providers": runner.providers, "latency": rows}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{folder}: load {result['load_ms']} ms, peak RSS {result['peak_rss_mb']} MB, on {runner.providers[0]}")
        for r in rows:
            print(f"  batch {r['batch']:>3}: p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}  {r['throughput_per_s']:.1f}/s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.inspect_model import inspect_model

    info = inspect_model(Path(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['file']}: {info['size_bytes']:,} bytes, IR {info['ir_version']}, opsets {info['opsets']}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            print(f"  {kind[:-1]:<6} {v['name']}: {v['dtype']} {v['shape']}")
    print(f"  params {info['params']:,}  weight bytes {info['bytes']:,}  nodes {info['nodes']}  sparsity {info['sparsity']:.1%}")
    print("  ops: " + ", ".join(f"{k}×{v}" for k, v in info["ops"].items()))
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _positive0(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepipe", description="Trained model to validated edge-deployment builds.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run a recipe: export, passes, emit, check")
    b.add_argument("recipe", nargs="+", help="one or more recipe files; each (recipe, target) is one build unit")
    b.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    b.add_argument("--target", help="comma-separated subset of the recipe's targets")
    b.add_argument("--force", action="store_true", help="replace existing artifacts")
    b.add_argument("-q", "--quiet", action="store_true", help="print only the summary lines")
    b.add_argument("--dry-run", action="store_true", help="check recipe, data, passes and output folder; build nothing")
    b.add_argument("--archive", action="store_true", help="also write OUT/<name>/<name>-<target>.tar.gz (reproducible)")
    b.add_argument("--json", action="store_true", help="print a JSON summary on stdout (progress on stderr)")
    b.add_argument("--executor", choices=("local", "inprocess", "ray"), default="local",
                   help="where units run: local child processes (default; a native crash costs only its target), inprocess, ray")
    b.add_argument("--address", help="Ray cluster to use: auto, HOST:PORT or ray://HOST:10001 (default: start a local Ray)")
    b.add_argument("--jobs", type=_positive, default=1, help="local: child processes at once (1: one per recipe); ray: CPUs of the local Ray")
    b.add_argument("--retries", type=_positive0, default=3, help="reruns of a unit whose process died (default: 3)")
    sign.add_build_options(b)
    b.set_defaults(func=cmd_build)
    v = sub.add_parser("verify", help="re-hash an artifact and rerun its golden I/O")
    v.add_argument("artifact", help="artifact folder or its .tar.gz")
    v.add_argument("--junit", help="write a JUnit XML report here")
    sign.add_verify_options(v)
    v.set_defaults(func=cmd_verify)
    be = sub.add_parser("bench", help="latency, throughput, load time, peak memory")
    be.add_argument("artifact")
    be.add_argument("--batch", default="1", help="batch sizes, e.g. 1,8")
    be.add_argument("--runs", type=int, default=100)
    be.add_argument("--warmup", type=int, default=10)
    be.add_argument("--threads", type=int, default=None)
    be.add_argument("--json", action="store_true")
    be.add_argument("--prefill", type=_positive, default=128, help="text-generation: prompt tokens of the timed prefill")
    be.add_argument("--decode", type=_positive, default=64, help="text-generation: greedy tokens timed after it")
    be.set_defaults(func=cmd_bench)
    i = sub.add_parser("inspect", help="inputs/outputs, opset, ops, params, size, sparsity")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    sign.add_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are bad input
        return 2 if exc.code not in (0, None) else 0
    debug = args.debug or os.environ.get("EDGEPIPE_DEBUG") == "1"
    try:
        return args.func(args)
    except EdgepipeError as exc:
        if debug:
            traceback.print_exc()
        print(f"edgepipe: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgepipe: interrupted; nothing was published", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permissions, vanished files: the user's environment
        if debug:
            traceback.print_exc()
        from edgepipe.core.errors import explain

        print(f"edgepipe: error: {explain(exc) or one_line(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"edgepipe: internal error: {type(exc).__name__}: {one_line(str(exc))} (rerun with --debug for the traceback)", file=sys.stderr)
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""`migctl simulate`: the argparse sub-command. `register(subparsers)` adds it to the
`migctl` parser; `run(args)` does the work and returns the exit code (2 for a mistake in
the arguments or the trace, with what to do next; no traceback)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from migctl.simulate.policy import PRESETS, Policy, SpecError, Timings, parse_policy, parse_timings
from migctl.simulate.trace import FORMATS, Trace, TraceError

DESCRIPTION = """\
Replay a job trace through the controller's own scheduling code on a virtual clock
(no Redis, no cloud, no sleeping) under several pool policies side by side. Prints
p50/p95/max queue wait, VM-hours running and stopped/suspended, and API calls per
policy, next to an oracle lower bound (perfect foresight, see `migctl.simulate.oracle`),
and writes an HTML plot of queue wait and pool size over time."""

EXAMPLES = """\
policies (-p, repeatable): a preset name, or NAME:key=value,... with keys
{keys}
  presets (`--list-presets` shows them): {presets}
  e.g. -p seed -p office -p "big:base=office,max_vms=100,warm=07:00-19:00@12"

examples:
  migctl simulate                                  the bundled workday, default policies
  migctl simulate -p seed -p "warm6:min_ready=6,rate=20,max_vms=100"
  migctl simulate --generate workday --seed 7 --jobs 5000 --write-trace day7.csv
  migctl simulate run-jobs.json                    a GitHub export: gh api --paginate \\
                                                   repos/O/R/actions/runs/ID/jobs > run-jobs.json
  migctl simulate trace.csv --timings create=55,jitter=0.2 --json > report.json
"""

DEFAULT_POLICIES = ("seed", "burst", "suspend", "office")
DEFAULT_LABELS = "self-hosted,linux,x64"
DEFAULT_PLOT = "migctl-simulate.html"


def _policy_arg(text: str) -> Policy:
    try:
        return parse_policy(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _timings_arg(text: str) -> Timings:
    try:
        return parse_timings(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected 1 to 1000000, got {value}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `simulate` to a `migctl` sub-parser set (`parser.add_subparsers()`)."""
    from migctl.simulate.policy import policy_help

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="compare pool policies on a job trace (virtual clock, no cloud)",
        description=DESCRIPTION,
        epilog=EXAMPLES.format(presets=", ".join(PRESETS), keys=policy_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "trace",
        nargs="?",
        help="a trace: .csv (arrival_s,labels,duration_s), .json, or the JSON of GitHub's "
        "GET .../actions/runs/ID/jobs; default: 'workday', the bundled one",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="auto", help="how to read TRACE (default: by content)"
    )
    parser.add_argument(
        "--generate",
        choices=("workday",),
        help="generate a trace instead of reading one (with --seed, --jobs)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed of --generate (default 1) and of timing jitter (default 0)",
    )
    parser.add_argument(
        "--jobs", type=_count_arg, help="jobs to generate with --generate (default 3000)"
    )
    parser.add_argument(
        "-p",
        "--policy",
        action="append",
        type=_policy_arg,
        metavar="SPEC",
        help=f"a policy to compare (repeatable, see below; default: {' '.join(DEFAULT_POLICIES)})",
    )
    parser.add_argument(
        "--timings",
        type=_timings_arg,
        default=Timings(),
        metavar="K=V,...",
        help="VM timings in seconds, the keys given override: create=40 start=20 resume=8 "
        "register=2 pickup=1 stop=10 suspend=10 delete=10, and jitter=0 (a fraction)",
    )
    parser.add_argument(
        "--labels",
        default=DEFAULT_LABELS,
        help=f"the pool's runner labels, comma-separated (default {DEFAULT_LABELS}); "
        "jobs they do not cover are left out",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--plot", default=DEFAULT_PLOT, metavar="PATH", help=f"HTML plot (default {DEFAULT_PLOT})"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument(
        "--write-trace",
        metavar="PATH",
        help="write the trace used (.csv or .json), e.g. to "
        "keep a generated one or convert a GitHub export",
    )
    parser.add_argument(
        "--list-presets", action="store_true", help="print the preset policies and exit"
    )
    parser.set_defaults(func=run)
    return parser


class UsageError(Exception):
    """A mistake in the arguments or inputs; the message says what to do."""


def _fail(message: str) -> int:
    print(f"migctl simulate: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UsageError, SpecError, TraceError) as exc:
        return _fail(str(exc))


def _run(args: argparse.Namespace) -> int:
    from migctl.simulate import report
    from migctl.simulate.engine import simulate
    from migctl.simulate.oracle import oracle

    if args.list_presets:
        for name, policy in PRESETS.items():
            print(f"{name:<10}{policy.describe()}")
        return 0
    if not args.no_plot and not Path(args.plot).resolve().parent.is_dir():
        raise UsageError(
            f"cannot write the plot to {args.plot}: its directory does not exist; "
            "choose another --plot PATH or pass --no-plot"
        )
    trace = _trace(args)
    labels = tuple(label.strip() for label in args.labels.split(",") if label.strip())
    if not labels:
        raise UsageError("--labels is empty: give the pool's runner labels, e.g. self-hosted,linux")
    if args.write_trace:
        _write_trace(trace, args.write_trace)
    runnable, left_out = _for_pool(trace, labels)
    policies: list[Policy] = args.policy or [PRESETS[name] for name in DEFAULT_POLICIES]
    names = [p.name for p in policies]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UsageError(f"policy name(s) given twice: {', '.join(dup)}; name each one apart")
    timings: Timings = args.timings
    seed = 0 if args.seed is None else args.seed
    runs = []
    for policy in policies:
        if sys.stderr.isatty() and not args.json:
            print(f"simulating {policy.name}...", file=sys.stderr)
        runs.append(simulate(runnable, policy, timings, labels, seed))
    bound = oracle(runnable, timings)
    result = report.build(runnable, left_out, labels, timings, bound, runs)
    out = sys.stderr if args.json else sys.stdout
    if args.json:
        sys.stdout.write(report.to_json(result))
    else:
        print(_heading(runnable, left_out, labels, timings))
        print(report.table(result))
    if not args.no_plot:
        from migctl.simulate.plot import render

        path = Path(args.plot)
        try:
            path.write_text(render(result, runs, bound, runnable.horizon), encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"cannot write the plot to {path}: {exc.strerror or exc}; "
                "choose another --plot PATH or pass --no-plot"
            ) from None
        print(f"plot: {path}", file=out)
    if any(run.unfinished for run in runs):
        print("some policies left jobs unrun (see above)", file=out)
    return 0


def _trace(args: argparse.Namespace) -> Trace:
    from migctl.simulate import trace as traces
    from migctl.simulate.workday import generate

    if args.generate:
        if args.trace:
            raise UsageError(
                f"give a trace file ({args.trace}) or --generate {args.generate}, not both"
            )
        return generate(1 if args.seed is None else args.seed, args.jobs or 3000)
    if args.jobs is not None:
        raise UsageError("--jobs only applies with --generate workday")
    return traces.load(args.trace or "workday", args.format)


def _write_trace(trace: Trace, target: str) -> None:
    from migctl.simulate import trace as traces

    path = Path(target)
    if path.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--write-trace {target}: name it .csv or .json")
    text = traces.to_json(trace) if path.suffix.lower() == ".json" else traces.to_csv(trace)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write the trace to {path}: {exc.strerror or exc}") from None


def _for_pool(trace: Trace, labels: tuple[str, ...]) -> tuple[Trace, int]:
    from migctl.domain.model import covers, label_key

    keep = [job for job in trace.jobs if covers(labels, job.labels)]
    if not keep:
        sets = sorted({label_key(job.labels) for job in trace.jobs})
        raise UsageError(
            f"none of the {len(trace.jobs)} jobs can run on a pool labelled "
            f"{','.join(labels)}; the trace asks for: {'; '.join(sets[:5])}"
            f"{' ...' if len(sets) > 5 else ''}. Pass --labels with the pool's labels"
        )
    return trace.only(keep), len(trace.jobs) - len(keep)


def _heading(trace: Trace, left_out: int, labels: tuple[str, ...], timings: Timings) -> str:
    extra = f" ({left_out} left out: labels not covered by the pool)" if left_out else ""
    steps = ", ".join(f"{k} {v:g}" for k, v in timings.as_dict().items() if k != "jitter")
    jitter = f", jitter ±{timings.jitter:.0%}" if timings.jitter else ""
    return (
        f"trace {trace.name}: {len(trace.jobs)} jobs{extra}, horizon {trace.horizon / 3600:g} h; "
        f"pool labels {','.join(labels)}\ntimings (s): {steps}{jitter}\n"
    )

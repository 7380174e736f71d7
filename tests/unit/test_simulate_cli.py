"""`migctl simulate` at its edges: the command line (output, byte-identical JSON, clear
errors), traces on disk, the GitHub jobs importer, the bundled trace and the plot."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from migctl.simulate import trace as traces
from migctl.simulate.cli import register
from migctl.simulate.github_import import from_github
from migctl.simulate.policy import PRESETS, SpecError, parse_duration, parse_policy, parse_timings
from migctl.simulate.workday import generate

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--generate", "workday", "--seed", "5", "--jobs", "120"]


def main(argv: list[str]) -> int:
    """What `migctl simulate ...` does once the lead wires `register` into migctl.cli."""
    parser = argparse.ArgumentParser(prog="migctl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", *argv])
    return int(args.func(args))


# -- the command --------------------------------------------------------------------------------


def test_prints_the_table_and_writes_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "sim.html"
    assert main([*SMALL, "-p", "seed", "-p", "office", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for needle in ("oracle (bound)", "seed", "office", "p95 s", "VM-h run", "reg_token"):
        assert needle in out
    assert f"plot: {plot}" in out
    page = plot.read_text()
    svgs = page.split("<svg")[1:]
    assert len(svgs) == 1 + 2 * 2  # the overview, then wait and pool per policy
    for svg in svgs:  # each one well-formed XML, so browsers draw it
        ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")


def test_the_same_seed_gives_a_byte_identical_json_report(tmp_path: Path) -> None:
    def report(seed: str, hash_seed: str) -> bytes:
        cmd = [sys.executable, "-m", "migctl.simulate", "--generate", "workday", "--seed", seed]
        cmd += ["--jobs", "120", "--json", "--no-plot", "--timings", "jitter=0.2"]
        cmd += ["-p", "seed", "-p", "office"]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=60, check=True)
        return done.stdout

    first = report("5", "1")
    assert first == report("5", "2")  # another process, another hash seed: same bytes
    assert first != report("6", "1")
    data = json.loads(first)
    assert [p["name"] for p in data["policies"]] == ["seed", "office"]
    assert data["trace"]["jobs"] == 120 and data["policies"][0]["unfinished"] == 0


def test_list_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "warm=07:00-19:00@10" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-p", "fast:speed=9"], "keys are base, min_ready, idle"),
        (["-p", "nosuch"], "is not a preset (seed, burst, suspend, office); give keys"),
        (["-p", "x:min_ready=80"], "does not fit max_vms=50; lower min_ready/warm or raise"),
        (["-p", "x:idle=soon"], "expected a duration like 600, 90s, 10m or 1h30m"),
        (["-p", "x:action=hibernate"], "expected stop, suspend or delete"),
        (["-p", "x:warm=8-18@4"], "expected a time of day HH:MM"),
        (["--timings", "create=-5"], "expected a duration"),
        (["--timings", "boot=5"], "keys are create, start, resume"),
        (["--jobs", "0", "--generate", "workday"], "expected 1 to 1000000"),
        (["--generate", "weekend"], "invalid choice: 'weekend'"),
    ],
)
def test_bad_arguments_are_refused_by_argparse_with_the_fix(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "usage: migctl simulate" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["no-such-trace.csv"], "no trace file at no-such-trace.csv: give a CSV or JSON trace"),
        (["--jobs", "10"], "--jobs only applies with --generate workday"),
        (["x.csv", "--generate", "workday"], "give a trace file (x.csv) or --generate workday"),
        ([*SMALL, "--labels", "gpu"], "none of the 120 jobs can run on a pool labelled gpu"),
        ([*SMALL, "-p", "a:min_ready=1", "-p", "a:base=seed"], "policy name(s) given twice: a"),
        ([*SMALL, "--plot", "/nonexistent/dir/p.html"], "choose another --plot PATH or pass"),
        ([*SMALL, "--write-trace", "out.txt", "--no-plot"], "name it .csv or .json"),
    ],
)
def test_bad_inputs_exit_2_with_what_to_do(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("migctl simulate: ") and expected in err and "Traceback" not in err


def test_a_broken_trace_file_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("# name: t\narrival_s,labels,duration_s\n0,self-hosted,60\n5,self-hosted,soon\n")
    assert main([str(bad), "--no-plot"]) == 2
    assert f"{bad}:4: duration_s must be a number of seconds, got 'soon'" in capsys.readouterr().err
    header = tmp_path / "h.csv"
    header.write_text("time,labels\n0,self-hosted\n")
    assert main([str(header), "--no-plot"]) == 2
    assert "header must name arrival_s, labels, duration_s" in capsys.readouterr().err


def test_write_trace_round_trips_through_csv_and_json(tmp_path: Path) -> None:
    for name in ("t.csv", "t.json"):
        assert main([*SMALL, "-p", "seed", "--no-plot", "--write-trace", str(tmp_path / name)]) == 0
    original = generate(seed=5, jobs=120)
    for name in ("t.csv", "t.json"):
        again = traces.load(str(tmp_path / name))
        assert [(j.arrival, j.labels, j.duration) for j in again.jobs] == [
            (j.arrival, j.labels, j.duration) for j in original.jobs
        ]
        assert again.horizon == 86400.0


# -- the bundled trace and the generator ---------------------------------------------------------


def test_the_bundled_workday_is_the_generator_s_seed_1_and_small() -> None:
    bundled = traces.load("workday")
    assert len(bundled.jobs) == 3000 and bundled.horizon == 86400.0
    assert traces.to_csv(bundled) == traces.to_csv(generate(seed=1, jobs=3000)), (
        "regenerate it: python -c 'from migctl.simulate.workday import generate; "
        "from migctl.simulate.trace import to_csv; "
        'open("migctl/sim/traces/workday.csv", "w").write(to_csv(generate(1, 3000)))\''
    )
    assert (REPO / "migctl/sim/traces/workday.csv").stat().st_size < 150_000


def test_the_workday_has_a_morning_ramp_a_lunch_dip_and_release_bursts() -> None:
    per_hour = [0] * 24
    for job in generate(seed=1, jobs=3000).jobs:
        per_hour[int(job.arrival // 3600)] += 1
    assert per_hour[4] < per_hour[7] < per_hour[8] < per_hour[10]  # ramp
    assert per_hour[12] < 0.6 * per_hour[11] and per_hour[12] < 0.6 * per_hour[14]  # lunch
    assert max(per_hour[20:]) < per_hour[9] / 5  # evening tail
    assert generate(seed=2, jobs=50) != generate(seed=3, jobs=50)
    assert generate(seed=2, jobs=50) == generate(seed=2, jobs=50)


# -- the GitHub importer -------------------------------------------------------------------------


def _gh_job(
    job_id: int, created: str, started: str | None, completed: str | None, **kw: object
) -> dict[str, object]:
    item: dict[str, object] = {
        "id": job_id,
        "run_id": 29679449,
        "run_url": "https://api.github.com/repos/octo-org/octo-repo/actions/runs/29679449",
        "node_id": "MDEyOldvcmtmbG93IEpvYjM5OTQ0NDQ5Ng==",
        "head_sha": "f83a356604ae3c5d03e1b46ef4d1ca77d64a90b0",
        "url": f"https://api.github.com/repos/octo-org/octo-repo/actions/jobs/{job_id}",
        "html_url": f"https://github.com/octo-org/octo-repo/runs/{job_id}",
        "status": "completed",
        "conclusion": "success",
        "created_at": created,
        "started_at": started,
        "completed_at": completed,
        "name": "build",
        "steps": [{"name": "Set up job", "status": "completed", "conclusion": "success"}],
        "check_run_url": f"https://api.github.com/repos/octo-org/octo-repo/check-runs/{job_id}",
        "labels": ["self-hosted", "linux", "x64"],
        "runner_id": 1,
        "runner_name": "pool-2vcpu-linux-abc123",
        "runner_group_id": 1,
        "runner_group_name": "Default",
        "workflow_name": "CI",
        "head_branch": "main",
    }
    item.update(kw)
    return item


GH_SAMPLE: dict[str, Any] = {
    "total_count": 5,
    "jobs": [
        _gh_job(1, "2024-05-02T09:00:00Z", "2024-05-02T09:00:30Z", "2024-05-02T09:05:30Z"),
        _gh_job(
            2,
            "2024-05-02T09:00:01Z",
            "2024-05-02T09:01:01Z",
            "2024-05-02T09:03:01Z",
            labels=["self-hosted", "linux", "arm64"],
        ),
        _gh_job(
            3,
            "2024-05-02T09:00:02Z",
            "2024-05-02T09:00:02Z",
            "2024-05-02T09:00:02Z",
            conclusion="skipped",
            runner_name=None,
        ),
        _gh_job(4, "2024-05-02T09:10:00Z", None, None, status="queued", conclusion=None),
        _gh_job(
            5,
            "2024-05-02T09:20:00Z",
            "2024-05-02T09:25:00Z",
            "2024-05-02T09:25:00Z",
            conclusion="cancelled",
            runner_name=None,
        ),
    ],
}


def test_the_importer_reads_github_s_jobs_listing() -> None:
    tr = from_github([GH_SAMPLE, {"total_count": 1, "jobs": [GH_SAMPLE["jobs"][0]]}], "run.json")
    assert [(j.id, j.arrival, j.duration, j.observed_wait) for j in tr.jobs] == [
        ("1", 9 * 3600.0, 300.0, 30.0),
        ("2", 9 * 3600.0 + 1, 120.0, 60.0),
    ]
    assert tr.jobs[1].labels == ("self-hosted", "linux", "arm64")
    assert tr.meta["origin"] == "2024-05-02T00:00:00Z"
    assert tr.meta["left_out"] == (
        "1 conclusion skipped, 1 duplicate, 1 no runner (cancelled while queued), 1 status queued"
    )


def test_a_github_export_simulates_with_its_observed_waits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run-jobs.json"
    path.write_text(json.dumps(GH_SAMPLE))
    assert main([str(path), "--json", "--no-plot", "-p", "seed"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trace"]["jobs"] == 1 and report["trace"]["left_out_not_for_pool"] == 1
    assert report["observed"]["wait_s"]["max"] == 30.0
    assert report["policies"][0]["wait_s"]["p50"] == 3.0  # a warm VM at 09:00


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"total_count": 0}, "an object with a 'jobs' list"),
        ({"jobs": [_gh_job(1, "yesterday", "x", "y")]}, "created_at is not an ISO 8601 time"),
        ({"jobs": [_gh_job(1, "2024-05-02T09:00:00Z", None, None)]}, "no completed job"),
    ],
)
def test_the_importer_explains_what_it_cannot_read(data: object, expected: str) -> None:
    with pytest.raises(traces.TraceError, match=expected):
        from_github(data, "x.json")


# -- specs ---------------------------------------------------------------------------------------


def test_policy_and_timing_specs() -> None:
    assert parse_duration("1h30m", "x") == 5400 and parse_duration("90s", "x") == 90
    policy = parse_policy("night:base=office,warm=22:00-06:00@1+09:00-17:00@6,rate=7")
    assert policy.max_scale_up_per_minute == 7 and policy.idle_action == "suspend"
    assert [policy.min_ready(h * 3600.0) for h in (23, 3, 7, 10, 18)] == [1, 1, 3, 6, 3]
    assert policy.next_warm_change(23 * 3600.0) == 24 * 3600.0 + 6 * 3600.0
    assert parse_policy("seed") == PRESETS["seed"]
    all_day = parse_policy("d:warm=00:00-24:00@4")
    assert all_day.min_ready(0.0) == all_day.min_ready(86399.0) == 4
    with pytest.raises(SpecError, match="HH:MM"):
        parse_policy("d:warm=18:00-24:30@4")
    assert parse_timings("create=1m,jitter=0.1").create == 60.0
    with pytest.raises(SpecError, match="jitter"):
        parse_timings("jitter=1.5")


def test_the_simulator_imports_no_io_library() -> None:
    code = (
        "import sys, migctl.simulate.cli, migctl.simulate.engine, migctl.simulate.plot;"
        "from migctl.simulate.cli import run;"
        "bad = [m for m in ('redis', 'celery', 'grpc', 'google', 'requests') if m in sys.modules];"
        "print(','.join(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr

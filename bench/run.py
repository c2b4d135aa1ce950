"""``python -m bench.run [--quick] [--out bench/results]``: the whole benchmark.

Phases, one after the other so that nothing timed shares the CPU with anything
else the benchmark does (only the model conversions run two at a time):

1. ``edgernn build --data basicmotions`` in a subprocess, timed; its folder is the
   model every daemon measurement uses (SimpleRNN, 64 units, trained).
2. Step and window models (:mod:`bench.models`, TensorFlow, two child processes).
3. Per-frame cost of step against window, and agreement (:mod:`bench.invoke`),
   one child per runtime.
4. Pipeline against bare loop in one process (:mod:`bench.pipeline`), one child
   per runtime.
5. A real edgernnd on pseudo-terminals (:mod:`bench.daemon_load`): throughput,
   one core with 8 ports, latency, memory, READY, per runtime.

Writes ``bench.json`` and ``bench.md`` into ``--out`` and prints the Markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from bench import child, daemon_load, machine, report
from edgernnd.errors import EdgernnError

logger = logging.getLogger("bench")

SCHEMA_VERSION = 1
BUILD_TIMEOUT_S = 600.0
# Seconds per window frame of converting an unrolled model, by cell (measured on
# a 2-core x86 VM); used only to share the conversions fairly between workers.
_CONVERT_COST_S_PER_FRAME = {"simplernn": 0.02, "lstm": 0.05, "gru": 0.11}
_STEP_CONVERT_COST_S = 3.0


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to measure and how long.

    Attributes:
        cells, units, windows: The step-vs-window grid.
        agreement_windows: W for the agreement of the trained model's predictions.
        runtimes: TFLite runtimes, each measured in every phase.
        repeats, min_repeat_s: Repeats per figure and the least length of one.
        pipeline_streams: Interleaved streams for the in-process pipeline.
        profile_frames: Frames profiled with cProfile (0: no profile).
        ready_repeats: Fresh daemon starts timed to READY=1.
        throughput_windows, throughput_window_s: Rate windows of the pty run.
        paced_duration_s: Length of each paced pty run.
        pty_repeats: Fresh daemon runs per pty figure (throughput, one core,
            latency); figures are medians over them.
        latency_rates_hz: Frames/s per stream of the latency runs.
        latency_streams: Ports (one stream each) of the latency runs.
        one_core_ports, one_core_baudrate: The one-core run's ports and line rate.
        memory_streams: Streams active in the memory run.
        build_runs: Timed ``edgernn build`` runs.
        conversion_budget_s: No conversion starts later than this after phase 2
            began; the rest are reported as skipped.
        workers: Conversion processes run at once.
    """

    cells: tuple[str, ...] = ("simplernn", "gru", "lstm")
    units: tuple[int, ...] = (32, 128)
    windows: tuple[int, ...] = (50, 100, 400)
    agreement_windows: tuple[int, ...] = (25, 50, 100)
    runtimes: tuple[str, ...] = ("tflite_runtime", "ai_edge_litert")
    repeats: int = 6
    min_repeat_s: float = 0.22
    pipeline_streams: tuple[int, ...] = (1, 8, 64)
    profile_frames: int = 20000
    ready_repeats: int = 5
    throughput_windows: int = 5
    throughput_window_s: float = 0.4
    paced_duration_s: float = 3.0
    pty_repeats: int = 3
    latency_rates_hz: tuple[float, ...] = (100.0, 1000.0)
    latency_streams: int = 8
    one_core_ports: int = 8
    one_core_baudrate: int = 921600
    memory_streams: int = 64
    build_runs: int = 1
    conversion_budget_s: float = 300.0
    workers: int = 2


FULL = BenchSettings()
QUICK = BenchSettings(cells=("simplernn",), units=(32,), windows=(50, 100),
                      agreement_windows=(50,), repeats=3, min_repeat_s=0.2,
                      profile_frames=5000, ready_repeats=3, throughput_windows=5,
                      throughput_window_s=0.3, paced_duration_s=1.5, pty_repeats=1,
                      conversion_budget_s=60.0)


def time_build(work_dir: Path, runs: int) -> dict:
    """Wall time of ``edgernn build --data basicmotions`` into fresh folders.

    Returns:
        median_s, runs_s, and model_dir (the first build's folder).

    Raises:
        EdgernnError: A build failed.
    """
    times = []
    for i in range(runs):
        out = work_dir / f"build{i}"
        log = work_dir / f"build{i}.log"
        started = time.monotonic()
        with open(log, "wb") as f:
            code = subprocess.run(
                [sys.executable, "-m", "edgernn.cli", "build", "--data",
                 "basicmotions", "--out", str(out)], stdout=f, stderr=subprocess.STDOUT,
                cwd=child.REPO, env=child.child_environment(),
                timeout=BUILD_TIMEOUT_S).returncode
        times.append(time.monotonic() - started)
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            raise EdgernnError(f"edgernn build exited with {code}:\n{tail}")
    return {"median_s": statistics.median(times), "runs_s": times,
            "model_dir": str(work_dir / "build0"),
            "command": "edgernn build --data basicmotions --out DIR"}


def timing_cpus() -> list[int]:
    """The one CPU the timing children run on: the first this process may use.

    One CPU keeps a child's threads (the pipeline's publisher beside inference)
    from passing the GIL between cores, which made repeats differ by 2x.
    """
    return [min(os.sched_getaffinity(0))]


def plan_model_jobs(settings: BenchSettings, trained_keras: Path | None) -> list[dict]:
    """The conversions phase 2 makes, each with an estimated cost in seconds."""
    jobs = []
    for cell in settings.cells:
        for units in settings.units:
            jobs.append({"kind": "step", "cell": cell, "units": units,
                         "out": f"step_{cell}{units}", "cost": _STEP_CONVERT_COST_S})
            for w in settings.windows:
                jobs.append({"kind": "window", "cell": cell, "units": units,
                             "window": w, "out": f"window_{cell}{units}_{w}.tflite",
                             "cost": 0.5 + w * _CONVERT_COST_S_PER_FRAME[cell]})
    if trained_keras is not None:
        for w in settings.agreement_windows:
            jobs.append({"kind": "window", "source": str(trained_keras), "window": w,
                         "out": f"trained_window_{w}.tflite",
                         "cost": 0.5 + w * _CONVERT_COST_S_PER_FRAME["simplernn"]})
    return jobs


def split_jobs(jobs: list[dict], workers: int) -> list[list[dict]]:
    """Longest first onto the least loaded worker; each worker runs cheapest first,
    so a spent time budget skips the largest conversions."""
    loads = [0.0] * workers
    shares: list[list[dict]] = [[] for _ in range(workers)]
    for job in sorted(jobs, key=lambda j: -j["cost"]):
        i = loads.index(min(loads))
        shares[i].append(job)
        loads[i] += job["cost"]
    return [sorted(share, key=lambda j: j["cost"]) for share in shares if share]


def make_models(jobs: list[dict], settings: BenchSettings, work_dir: Path) -> list[dict]:
    """Runs the conversions in ``settings.workers`` child processes at once."""
    out_dir = work_dir / "models"
    out_dir.mkdir(exist_ok=True)
    deadline = time.time() + settings.conversion_budget_s
    shares = split_jobs(jobs, settings.workers)
    results: list[list[dict]] = [[] for _ in shares]
    failures: list[str] = []

    def work(i: int) -> None:
        try:
            results[i] = child.run_child(
                "bench.models", {"jobs": shares[i], "out_dir": str(out_dir),
                                 "deadline_unix": deadline}, work_dir, f"models{i}")
        except EdgernnError as e:
            failures.append(str(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise EdgernnError("model conversion failed: " + "; ".join(failures))
    return [r for share in results for r in share]


def save_recordings(path: Path) -> int:
    """The BasicMotions test split as an .npz for the children; returns its size."""
    from edgernn.datasets import load_builtin

    test = load_builtin("basicmotions")[1]
    np.savez(path, count=len(test.sequences), labels=test.label_indices(),
             **{f"r{i}": s for i, s in enumerate(test.sequences)})
    return len(test.sequences)


def measure_step_vs_window(jobs: list[dict], settings: BenchSettings, work_dir: Path,
                           model_dir: Path) -> tuple[dict, dict]:
    """Phase 3: (step_vs_window section, agreement section)."""
    recordings = work_dir / "test_recordings.npz"
    count = save_recordings(recordings)
    networks = []
    for job in jobs:
        if job["kind"] != "step" or not job.get("ok"):
            continue
        windows = [{"path": w["path"], "bytes": w["bytes"], "convert_s": w["convert_s"]}
                   for w in jobs if w["kind"] == "window" and w.get("ok")
                   and not w.get("source") and (w["cell"], w["units"]) == (
                       job["cell"], job["units"])]
        networks.append({"cell": job["cell"], "units": job["units"],
                         "step_dir": job["path"], "step_bytes": job["bytes"],
                         "windows": windows})
    trained = [{"path": w["path"]} for w in jobs
               if w.get("source") and w.get("ok")]
    section: dict = {"jobs": jobs, "runtimes": {}}
    agreement: dict = {"model": "edgernn build --data basicmotions (SimpleRNN, 64 "
                                "units, trained)", "recordings": count, "runtimes": {},
                       "note": "BasicMotions recordings have 100 frames, so no "
                               "agreement exists for W > 100."}
    for runtime in settings.runtimes:
        job = {"runtime": runtime, "repeats": settings.repeats, "cpus": timing_cpus(),
               "min_repeat_s": settings.min_repeat_s, "networks": networks,
               "agreement": {"step_dir": str(model_dir), "recordings": str(recordings),
                             "windows": trained} if trained else None}
        result = child.run_child("bench.invoke", job, work_dir, f"invoke-{runtime}",
                                 runtime)
        section["runtimes"][runtime] = result
        agreement["runtimes"][runtime] = result["agreement"]
    return section, agreement


def measure_pipeline(settings: BenchSettings, work_dir: Path, model_dir: Path) -> dict:
    """Phase 4: in-process pipeline against bare loop, per runtime."""
    section = {}
    for i, runtime in enumerate(settings.runtimes):
        job = {"model_dir": str(model_dir), "repeats": settings.repeats,
               "cpus": timing_cpus(),
               "min_repeat_s": settings.min_repeat_s,
               "streams": list(settings.pipeline_streams),
               # Stages and profile are runtime-independent but for the invoke.
               "stages": i == 0, "profile_frames": settings.profile_frames if i == 0
               else 0}
        section[runtime] = child.run_child("bench.pipeline", job, work_dir,
                                           f"pipeline-{runtime}", runtime)
    return section


def measure_daemon(settings: BenchSettings, work_dir: Path, model_dir: Path,
                   result: dict) -> None:
    """Phase 5: a real edgernnd on pseudo-terminals, per runtime, into ``result``."""
    from edgernn.datasets import load_builtin

    recordings = load_builtin("basicmotions")[1].sequences
    pool = daemon_load.FramePool(recordings)
    cpus = sorted(os.sched_getaffinity(0))
    # (daemon CPUs, this process's CPUs): free, and the daemon alone on one core.
    placements = [(None, None)]
    if len(cpus) >= 2:
        placements.append(({cpus[0]}, {cpus[1]}))
    rate = daemon_load.serial_capacity_fps(settings.one_core_baudrate,
                                           pool.frame_bytes)
    runs: dict = {}
    for repeat in range(settings.pty_repeats):
        # Runtimes take turns, so that a drift of the machine hits both alike.
        for runtime in settings.runtimes:
            logger.info("daemon on pseudo-terminals, %s, run %d of %d", runtime,
                        repeat + 1, settings.pty_repeats)
            for i, placement in enumerate(placements):
                runs.setdefault(("throughput", runtime, i), []).append(
                    daemon_load.measure_throughput(
                        model_dir, runtime, work_dir, pool,
                        settings.throughput_windows, settings.throughput_window_s,
                        *placement))
            runs.setdefault(("one_core", runtime, 0), []).append(
                daemon_load.run_paced(model_dir, runtime, work_dir, pool,
                                      settings.one_core_ports, rate,
                                      settings.paced_duration_s, *placements[-1]))
            for j, rate_hz in enumerate(settings.latency_rates_hz):
                for i, placement in enumerate(placements):
                    runs.setdefault(("latency", runtime, (j, i)), []).append(
                        daemon_load.run_paced(
                            model_dir, runtime, work_dir, pool,
                            settings.latency_streams, rate_hz,
                            settings.paced_duration_s, *placement))
    for key in ("ready", "throughput", "one_core", "latency", "memory"):
        result.setdefault(key, {})
    for (kind, runtime, _), measured in runs.items():
        combined = daemon_load.combine_runs(measured)
        if kind == "one_core":
            result[kind][runtime] = combined
        else:
            result[kind].setdefault(runtime, []).append(combined)
    for runtime in settings.runtimes:
        result["ready"][runtime] = daemon_load.measure_ready(
            model_dir, runtime, work_dir, settings.ready_repeats)
        result["memory"][runtime] = daemon_load.measure_memory(
            model_dir, runtime, work_dir, recordings, settings.memory_streams)


def _phase(result: dict, name: str, function, *args):
    """Runs one phase; a failure is recorded in result["errors"] and logged."""
    logger.info("phase: %s", name)
    started = time.monotonic()
    try:
        return function(*args)
    except Exception as e:  # noqa: BLE001 - one phase failing must not hide the rest
        logger.error("phase %s failed: %s", name, e)
        logger.debug("%s", traceback.format_exc())
        result["errors"].append(f"{name}: {type(e).__name__}: {e}")
        return None
    finally:
        result["phase_seconds"][name] = time.monotonic() - started


def run_bench(settings: BenchSettings, work_dir: Path, model_dir: Path | None = None,
              quick: bool = False) -> dict:
    """Runs every phase and returns the result (see bench.json for its keys).

    Args:
        settings: What to measure.
        work_dir: Scratch folder for models, logs and sockets.
        model_dir: A built BasicMotions model folder to use instead of building
            one (the build is then not timed).
        quick: Recorded in the result.
    """
    started = time.monotonic()
    result: dict = {
        "schema": SCHEMA_VERSION, "quick": quick,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine.describe_machine(),
        "settings": dataclasses.asdict(settings), "errors": [], "phase_seconds": {}}
    if model_dir is None:
        build = _phase(result, "build", time_build, work_dir, settings.build_runs)
        result["build"] = build
        model_dir = Path(build["model_dir"]) if build else None
    else:
        result["build"] = {"median_s": None, "runs_s": [],
                           "note": f"not measured: the model folder {model_dir} was "
                                   "given"}
    if model_dir is None:
        raise EdgernnError("no model folder: " + "; ".join(result["errors"]))
    keras_file = model_dir / "model.keras"
    jobs = plan_model_jobs(settings, keras_file if keras_file.is_file() else None)
    made = _phase(result, "models", make_models, jobs, settings, work_dir)
    if made is not None:
        measured = _phase(result, "step_vs_window", measure_step_vs_window, made,
                          settings, work_dir, model_dir)
        if measured is not None:
            result["step_vs_window"], result["agreement"] = measured
    result["pipeline"] = _phase(result, "pipeline", measure_pipeline, settings,
                                work_dir, model_dir) or {}
    _phase(result, "daemon", measure_daemon, settings, work_dir, model_dir, result)
    result["duration_s"] = time.monotonic() - started
    result["aims"] = report.check_aims(result)
    return result


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Writes bench.json and bench.md; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "bench.json", out_dir / "bench.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(report.render_markdown(result))
    return json_path, md_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Measure edgernn side by side in one run: step vs window models, "
                    "pipeline vs bare invoke, a real edgernnd on pseudo-terminals, "
                    "memory, start-up and the host build.")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller grid and shorter runs (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for bench.json and bench.md")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="use this built BasicMotions model folder instead of "
                             "timing a build")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep models and logs here (default: a temporary "
                             "folder, removed afterwards)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="edgernn-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_bench(QUICK if args.quick else FULL, work_dir.resolve(),
                           args.model_dir.resolve() if args.model_dir else None,
                           quick=args.quick)
        json_path, md_path = write_results(result, args.out)
    except EdgernnError as e:
        if args.debug:
            raise
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

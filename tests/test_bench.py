"""The benchmark's pieces on a tiny configuration: shape and sanity of the result.

Nothing here asserts a speed. The smoke test runs every phase of ``bench.run``
(conversions, timing children, the in-process pipeline, a real edgernnd on
pseudo-terminals) with loops of a few milliseconds and checks that the result has
every key, positive figures, and counts that add up.
"""

import json
import os

import numpy as np
import pytest

from bench import daemon_load, report, run
from bench.daemon_proc import (
    parse_metrics_totals,
    read_cpu_s,
    read_memory_mb,
)
from bench.timing import percentile, time_repeated  # noqa: E402
from edgernnd.binary_codec import BinaryDecoder

RUNTIME = "tflite_runtime"
TINY = run.BenchSettings(
    cells=("simplernn",), units=(8,), windows=(10,), agreement_windows=(10,),
    runtimes=(RUNTIME,), repeats=2, min_repeat_s=0.01, pipeline_streams=(1, 4),
    profile_frames=200, ready_repeats=1, throughput_windows=2,
    throughput_window_s=0.1, paced_duration_s=0.8, latency_rates_hz=(50.0,),
    latency_streams=2, one_core_ports=2, one_core_baudrate=9600, memory_streams=4,
    pty_repeats=1, build_runs=0, conversion_budget_s=300.0, workers=1)


def test_percentile_interpolates_between_order_statistics():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_time_repeated_runs_each_repeat_long_enough():
    calls = []

    def body(n):
        calls.append(n)
        sum(range(200 * n))

    timing = time_repeated(body, repeats=3, min_repeat_s=0.005)
    assert len(timing.repeats_s) == 3
    assert calls[-3:] == [timing.iterations] * 3
    assert timing.median_s * timing.iterations >= 0.005 * 0.5
    assert timing.median_s in timing.repeats_s


def test_frame_pool_take_wraps_to_consecutive_sequence_numbers():
    pool = daemon_load.FramePool([np.arange(12, dtype=np.float32).reshape(2, 6)])
    data = pool.take(daemon_load.SEQ_CYCLE - 2, 4)
    frames = BinaryDecoder(channels=6).feed(data)
    assert [f.seq for f in frames] == [65534, 65535, 0, 1]
    assert len(data) == 4 * pool.frame_bytes
    np.testing.assert_array_equal(frames[2].values, np.arange(6, dtype=np.float32))


def test_serial_capacity_counts_ten_bits_per_byte():
    assert daemon_load.serial_capacity_fps(115200, 39) == pytest.approx(295.38, 1e-3)
    assert daemon_load.serial_capacity_fps(921600, 39) == pytest.approx(2363.08, 1e-3)


def test_split_jobs_balances_cost_and_runs_cheapest_first():
    jobs = [{"cost": c, "out": str(c)} for c in (10.0, 9.0, 2.0, 1.0, 1.0)]
    shares = run.split_jobs(jobs, 2)
    loads = sorted(sum(j["cost"] for j in share) for share in shares)
    assert loads == [11.0, 12.0]
    for share in shares:
        assert [j["cost"] for j in share] == sorted(j["cost"] for j in share)


def test_proc_parsers_read_fields(tmp_path):
    stat = tmp_path / "stat"
    # A command name with spaces and a parenthesis must not shift the fields.
    stat.write_text("123 (py thon) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0\n")
    assert read_cpu_s(stat) == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n")
    assert read_memory_mb(status) == {"VmHWM": 50.0, "VmRSS": 40.0}
    text = ('# HELP a x\n# TYPE a counter\na{port="p0"} 3\na{port="p1"} 4\nb 0.5\n')
    assert parse_metrics_totals(text) == {"a": 7.0, "b": 0.5}


def test_run_bench_tiny_has_every_figure(basicmotions_model, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result = run.run_bench(TINY, work, model_dir=basicmotions_model, quick=True)
    assert result["errors"] == []

    machine = result["machine"]
    assert machine["cpu_model"] and machine["logical_cpus"] >= 1
    assert machine["versions"]["numpy"] == np.__version__

    section = result["step_vs_window"]["runtimes"][RUNTIME]
    assert section["tensorflow_imported"] is False
    (model,) = section["models"]
    assert (model["cell"], model["units"]) == ("simplernn", 8)
    (window,) = model["windows"]
    assert window["window"] == 10 and window["window_s"] > 0 and model["step_s"] > 0
    assert window["ratio"] == pytest.approx(window["window_s"] / model["step_s"])

    (agreement,) = result["agreement"]["runtimes"][RUNTIME]
    # 40 test recordings of 100 frames: frames 10..100 of each have a full window.
    assert agreement["frames_compared"] == 40 * 91
    for key in ("top1_agreement", "step_accuracy", "window_accuracy"):
        assert 0.0 <= agreement[key] <= 1.0

    pipeline = result["pipeline"][RUNTIME]
    assert pipeline["tensorflow_imported"] is False
    assert [s["streams"] for s in pipeline["streams"]] == [1, 4]
    for s in pipeline["streams"]:
        assert s["pipeline_fps"] > 0 and s["bare_fps"] > 0
        assert s["ratio"] == pytest.approx(s["pipeline_fps"] / s["bare_fps"])
        assert s["dropped"] == 0 and s["decoder_rejected"] == 0
    assert set(pipeline["stages_us"]) >= {"decode", "quantize", "step", "process",
                                          "encode"}
    assert pipeline["profile"]["top"][0]["calls"] > 0

    for t in result["throughput"][RUNTIME]:
        assert t["fps"] > 0 and t["predictions"] == t["frames_written"]
        assert t["x_115200"] == pytest.approx(8 * t["x_921600"])

    one_core = result["one_core"][RUNTIME]
    assert one_core["sent"] == one_core["received"] > 0
    assert one_core["missing"] == 0 and one_core["exit_code"] == 0

    (latency,) = [r for r in result["latency"][RUNTIME] if r["daemon_cpus"] == "all"]
    assert latency["received_per_port"] == [40, 40]
    lat = latency["latency_ms"]
    assert 0 < lat["median"] <= lat["p99"] <= lat["max"]
    assert set(latency["latency_parts_ms"]) == {"to_daemon", "in_daemon", "to_reader"}

    memory = result["memory"][RUNTIME]
    assert memory["all_predictions_received"] is True
    for key in ("ready", "streams_1", "streams_4"):
        assert memory[key]["VmHWM"] >= memory[key]["VmRSS"] > 10
    assert 0 < result["ready"][RUNTIME]["median_s"] < 30

    aims = {a["aim"]: a for a in result["aims"]}
    assert not any(name.startswith("step vs window") for name in aims)  # no W=100
    assert all(a["met"] in (True, False) for a in result["aims"])
    assert any(name.startswith("start-up") for name in aims)

    json_path, md_path = run.write_results(result, tmp_path / "out")
    assert json.loads(json_path.read_text())["schema"] == run.SCHEMA_VERSION
    page = md_path.read_text()
    for heading in ("## Aims", "## 1. Step model vs sliding window",
                    "## 2. Pipeline vs bare invoke", "## 3. Latency",
                    "## 4. Memory and start-up", "## 6. Host build"):
        assert heading in page
    assert report.render_markdown(result) == page

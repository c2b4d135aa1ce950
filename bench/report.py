"""The aims, checked against a bench result, and the result as a Markdown page.

:func:`check_aims` reads the result dict :func:`bench.run.run_bench` returns and
says, per aim and runtime, what was measured and whether the aim was met (and by
how much it was missed). :func:`render_markdown` turns the whole result into the
tables of ``bench.md``.
"""

from __future__ import annotations

import math
from typing import Any

# The aims the project set itself (see the README's Performance section).
STEP_WINDOW_AIM = 10.0  # step model at least this many times cheaper per frame
STEP_WINDOW_AIM_WINDOW = 100
STEP_WINDOW_AIM_UNITS = 32
PIPELINE_AIM = 1.0 / 3.0  # pipeline rate over bare loop rate, one stream
ONE_CORE_AIM_SHARE = 0.99  # frames processed in time, as a share of frames sent
LATENCY_AIM_MS = 2.0  # p99 at 8 streams x 1000 frames/s
LATENCY_AIM_RATE_HZ = 1000.0
RSS_AIM_MB = 60.0
READY_AIM_S = 1.0
BUILD_AIM_S = 60.0


def _aim(name: str, target: str, runtime: str | None, measured: str, met: bool | None,
         note: str = "") -> dict:
    return {"aim": name, "target": target, "runtime": runtime, "measured": measured,
            "met": None if met is None else bool(met), "note": note}


def _missed_by(value: float, limit: float, higher_is_better: bool) -> str:
    if higher_is_better:
        return f"missed: {value / limit:.2f} of the aim" if value < limit else ""
    return f"missed: {value / limit:.1f}x the limit" if value > limit else ""


def check_aims(result: dict) -> list[dict]:
    """One entry per aim and runtime: target, measured, met (None: not measured)."""
    aims = []
    for runtime, entry in result.get("step_vs_window", {}).get("runtimes", {}).items():
        ratios = []
        for model in entry["models"]:
            if model["units"] != STEP_WINDOW_AIM_UNITS:
                continue
            for window in model["windows"]:
                if window["window"] == STEP_WINDOW_AIM_WINDOW:
                    ratios.append((model["cell"], window["ratio"]))
        if ratios:
            worst = min(r for _, r in ratios)
            text = ", ".join(f"{cell} {r:.1f}x" for cell, r in ratios)
            aims.append(_aim("step vs window, per frame (W=100, 32 units)",
                             f">= {STEP_WINDOW_AIM:g}x cheaper", runtime, text,
                             worst >= STEP_WINDOW_AIM,
                             _missed_by(worst, STEP_WINDOW_AIM, True)))
    for runtime, entry in result.get("pipeline", {}).items():
        one = next((s for s in entry["streams"] if s["streams"] == 1), None)
        if one:
            aims.append(_aim("pipeline vs bare invoke loop (1 stream)",
                             ">= 1/3 of the bare rate", runtime,
                             f"{one['ratio']:.3f} ({one['pipeline_fps']:,.0f} vs "
                             f"{one['bare_fps']:,.0f} frames/s)",
                             one["ratio"] >= PIPELINE_AIM,
                             _missed_by(one["ratio"], PIPELINE_AIM, True)))
    for runtime, entry in result.get("one_core", {}).items():
        runs = entry.get("runs", [entry])
        lost = sum(r["missing"] for r in runs)
        sent = sum(r["sent"] for r in runs)
        share = entry["processed_share"]
        ok = lost == 0 and share >= ONE_CORE_AIM_SHARE
        aims.append(_aim("one core, 8 ports at 921600 baud, binary",
                         "no frame dropped, keeps up", runtime,
                         f"{lost} of {sent} frames lost over {len(runs)} run(s); "
                         f"processed {share:.0%} of the offered rate in time",
                         ok, "" if ok else f"missed: kept up with {share:.0%} of "
                         "the rate"))
    for runtime, runs in result.get("latency", {}).items():
        for run in runs:
            if run["rate_hz_per_port"] != LATENCY_AIM_RATE_HZ or "latency_ms" not in run:
                continue
            p99 = run["latency_ms"]["p99"]
            aims.append(_aim(f"p99 latency, {run['ports']} streams x 1000 frames/s, "
                             f"daemon on {placement(run)}",
                             f"< {LATENCY_AIM_MS:g} ms", runtime,
                             f"{p99:.2f} ms{_spread(run, ('latency_ms', 'p99'))}",
                             p99 < LATENCY_AIM_MS,
                             _missed_by(p99, LATENCY_AIM_MS, False)))
    for runtime, entry in result.get("memory", {}).items():
        key = max((k for k in entry if k.startswith("streams_")),
                  key=lambda k: int(k.split("_")[1]), default=None)
        if key:
            hwm = entry[key]["VmHWM"]
            aims.append(_aim(f"resident memory ({key.replace('_', ' ')})",
                             f"< {RSS_AIM_MB:g} MB", runtime,
                             f"VmHWM {hwm:.1f} MB", hwm < RSS_AIM_MB,
                             _missed_by(hwm, RSS_AIM_MB, False)))
    for runtime, entry in result.get("ready", {}).items():
        aims.append(_aim("start-up to READY=1", f"< {READY_AIM_S:g} s", runtime,
                         f"{entry['median_s']:.2f} s", entry["median_s"] < READY_AIM_S,
                         _missed_by(entry["median_s"], READY_AIM_S, False)))
    build = result.get("build")
    if build and build.get("median_s") is not None:
        aims.append(_aim("edgernn build --data basicmotions", f"< {BUILD_AIM_S:g} s",
                         None, f"{build['median_s']:.1f} s",
                         build["median_s"] < BUILD_AIM_S,
                         _missed_by(build["median_s"], BUILD_AIM_S, False)))
    return aims


def placement(run: dict) -> str:
    """Where the daemon ran: ``all CPUs`` or ``CPU 0``."""
    cpus = run.get("daemon_cpus", "all")
    if cpus == "all":
        return "all CPUs"
    return "CPU " + ",".join(str(c) for c in cpus)


def _spread(entry: dict, path: tuple[str, ...], fmt: str = ".2f") -> str:
    """`` (a-b over n runs)`` from the entry's runs, or "" for a single run."""
    runs = entry.get("runs") or []
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            values.append(value)
    if len(values) < 2:
        return ""
    return f" ({format(min(values), fmt)}-{format(max(values), fmt)} over {len(values)} runs)"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.1f}"


def _num(value: float | None, fmt: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _met(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def render_markdown(result: dict) -> str:
    """The bench result as a Markdown page (title, aims, one table per figure)."""
    m = result["machine"]
    s = result["settings"]
    out = ["# edgernn benchmark", "",
           f"{result['started']}, {'quick' if result['quick'] else 'full'} run, "
           f"{result['duration_s']:.0f} s. {m['cpu_model']}, {m['logical_cpus']} "
           f"CPUs, Python {m['python']}, numpy {m['versions'].get('numpy')}, "
           f"tflite-runtime {m['versions'].get('tflite-runtime')}, ai-edge-litert "
           f"{m['versions'].get('ai-edge-litert')}, TensorFlow "
           f"{m['versions'].get('tensorflow-cpu') or m['versions'].get('tensorflow')}.",
           "",
           f"Every time is the median of {s['repeats']} repeats of at least "
           f"{s['min_repeat_s']} s unless said otherwise; ratios are measured in "
           "the same run. Absolute figures vary by machine; compare ratios.", ""]

    out += ["## Aims", ""]
    out += _table(["aim", "target", "runtime", "measured", "result"],
                  [[a["aim"], a["target"], a["runtime"] or "-", a["measured"],
                    _met(a["met"]) + (f" ({a['note']})" if a["note"] else "")]
                   for a in result["aims"]])

    out += _render_step_window(result)
    out += _render_pipeline(result)
    out += _render_daemon(result)
    out += _render_runtimes(result)
    build = result.get("build") or {}
    out += ["## 6. Host build", ""]
    if build.get("median_s") is not None:
        out += [f"`edgernn build --data basicmotions` (SimpleRNN 64 units, fresh "
                f"folder, subprocess): median {build['median_s']:.1f} s over "
                f"{len(build['runs_s'])} run(s): "
                + ", ".join(f"{v:.1f} s" for v in build["runs_s"]) + ".", ""]
    else:
        out += [build.get("note", "not measured"), ""]
    if result.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(out)


def _render_step_window(result: dict) -> list[str]:
    section = result.get("step_vs_window")
    if not section:
        return []
    runtimes = list(section["runtimes"])
    out = ["## 1. Step model vs sliding window, per frame", "",
           "int8, batch 1, one thread, the timing process pinned to one CPU. "
           "Step: set frame and state, invoke, read scores and state. Window: "
           "shift the frame into a W-frame int8 buffer, set it, invoke the "
           "unrolled model, read the scores. Times in µs per frame; "
           "x = window / step. Step models: random weights, the product's export "
           "and int8 quantization; window models: the same weights, unroll=True, "
           "full int8. Conversion: wall time, and the peak RSS of the converting "
           "process so far.", ""]
    header = ["cell", "units", "W"]
    for rt in runtimes:
        header += [f"step µs ({rt})", f"window µs ({rt})", f"x ({rt})"]
    header += ["window .tflite", "conversion"]
    rows = []
    by_key: dict = {}
    for rt in runtimes:
        for model in section["runtimes"][rt]["models"]:
            for w in model["windows"]:
                by_key.setdefault((model["cell"], model["units"], w["window"]), {})[
                    rt] = (model["step_s"], w)
    order = {"simplernn": 0, "gru": 1, "lstm": 2}
    grid = sorted((j for j in section["jobs"]
                   if j["kind"] == "window" and not j.get("source")),
                  key=lambda j: (order.get(j["cell"], 9), j["units"], j["window"]))
    for job in grid:
        key = (job["cell"], job["units"], job["window"])
        row = [job["cell"], job["units"], job["window"]]
        for rt in runtimes:
            got = by_key.get(key, {}).get(rt)
            if got:
                step_s, w = got
                row += [_us(step_s), _us(w["window_s"]), f"{w['ratio']:.1f}"]
            else:
                row += ["-", "-", "-"]
        if job.get("ok"):
            row += [f"{job['bytes'] / 1024:,.0f} KiB",
                    f"{job['convert_s']:.1f} s, peak RSS {job['peak_rss_mb']:,.0f} MB"]
        else:
            row += ["-", job.get("error", "failed")]
        rows.append(row)
    out += _table(header, rows)
    agreement = result.get("agreement") or {}
    if agreement.get("runtimes"):
        out += ["### Agreement of predictions", "",
                f"{agreement['model']}: at every frame t >= W of the "
                f"{agreement['recordings']} test recordings, the step model (state "
                "carried from the recording's start) against the window model (the "
                "last W frames). Accuracy is against the recording's label on the "
                "same frames.", ""]
        header = ["W", "frames compared"]
        for rt in agreement["runtimes"]:
            header += [f"top-1 agreement ({rt})", f"step acc. ({rt})",
                       f"window acc. ({rt})"]
        rows = []
        windows = sorted({a["window"] for rt in agreement["runtimes"].values()
                          for a in rt})
        for w in windows:
            row: list[Any] = [w, "-"]
            for rt in agreement["runtimes"].values():
                a = next((x for x in rt if x["window"] == w), None)
                if a and a.get("frames_compared"):
                    row[1] = a["frames_compared"]
                    row += [f"{a['top1_agreement']:.1%}", f"{a['step_accuracy']:.1%}",
                            f"{a['window_accuracy']:.1%}"]
                else:
                    row += ["-", "-", "-"]
            rows.append(row)
        out += _table(header, rows)
        if agreement.get("note"):
            out += [agreement["note"], ""]
    return out


def _render_pipeline(result: dict) -> list[str]:
    section = result.get("pipeline")
    if not section:
        return []
    out = ["## 2. Pipeline vs bare invoke, in one process", "",
           "Pipeline: binary decode, the daemon's `_process` (checks, normalize, "
           "quantize, state swap, invoke, dequantize), the publisher thread and "
           "JSON encoding into a null sink. Bare: set_tensor + invoke + get_tensor "
           "on the same interpreter. One process pinned to one CPU. Frames per "
           "second; ratio = pipeline / bare.", ""]
    rows = []
    for rt, entry in section.items():
        for st in entry["streams"]:
            rows.append([rt, st["streams"], _num(st["pipeline_fps"]),
                         _num(st["bare_fps"]), f"{st['ratio']:.3f}"])
        rows.append([rt, "invoke() alone", "-", _num(entry["invoke_only_fps"]), "-"])
    out += _table(["runtime", "streams", "pipeline frames/s", "bare frames/s",
                   "ratio"], rows)
    for rt, entry in section.items():
        if entry.get("stages_us"):
            st = entry["stages_us"]
            out += [f"Per-frame cost by stage ({rt}, one stream, µs): "
                    + ", ".join(f"{k} {v:.1f}" for k, v in st.items())
                    + f"; whole pipeline {1e6 / entry['streams'][0]['pipeline_fps']:.1f}"
                    " (the rest is the hand-off to the publisher thread).", ""]
        if entry.get("profile"):
            p = entry["profile"]
            out += [f"Profile ({rt}, {p['note']}; {p['frames']} frames, "
                    f"{p['total_s']:.2f} s):", ""]
            out += _table(["function", "calls", "own %", "cumulative %"],
                          [[f"`{r['where']}`", r["calls"], f"{r['own_share']:.1%}",
                            f"{r['cumulative_share']:.1%}"] for r in p["top"][:12]])
    return out


def _render_daemon(result: dict) -> list[str]:
    out = []
    throughput = result.get("throughput")
    if throughput:
        frame_bytes = next(iter(throughput.values()))[0]["frame_bytes"]
        out += ["### Through a pseudo-terminal to a real edgernnd", "",
                f"One port, one stream, binary float32 frames of {frame_bytes} bytes "
                "on the wire (COBS and delimiter included; 10 bits per byte on a "
                "UART). The writer keeps the daemon busy without letting a backlog "
                "grow; each run's rate is the median of its rate windows, the "
                "figure the median over runs (range in brackets).", ""]
        out += _table(["runtime", "daemon on", "predictions/s",
                       "x one port at 115200", "x one port at 921600", "CPU (cores)"],
                      [[rt, placement(t), _num(t["fps"]) + _spread(t, ("fps",), ",.0f"),
                        f"{t['x_115200']:.1f}",
                        f"{t['x_921600']:.2f}", f"{t['cpu_cores_used']:.2f}"]
                       for rt, runs in throughput.items() for t in runs])
    one_core = result.get("one_core")
    if one_core:
        first = next(iter(one_core.values()))
        out += ["### One core, 8 ports at 921600 baud's frame rate", "",
                f"The daemon pinned to CPU 0, the writer to CPU 1; each port gets "
                f"{first['rate_hz_per_port']:,.0f} frames/s for "
                f"{first['duration_s']:g} s, in {len(first.get('runs', [first]))} "
                "fresh run(s). Lost = sent - predictions received, summed over "
                "runs; the rest are medians over runs.", ""]
        rows = []
        for rt, o in one_core.items():
            runs = o.get("runs", [o])
            rows.append([
                rt, _num(o["target_fps"]), sum(r["sent"] for r in runs),
                sum(r["received"] for r in runs), sum(r["missing"] for r in runs),
                _num(sum(r["frames_dropped_by_daemon"] or 0 for r in runs)),
                f"{o['processed_share']:.0%}" + _spread(o, ("processed_share",),
                                                        ".0%"),
                f"{o['cpu_cores_used']:.2f}",
                (f"{o['latency_ms']['median']:.1f} / {o['latency_ms']['p99']:.1f}"
                 if "latency_ms" in o else "-")])
        out += _table(
            ["runtime", "offered frames/s", "sent", "received", "lost",
             "dropped by daemon", "processed in time", "CPU (cores)",
             "latency median / p99 ms"], rows)
    latency = result.get("latency")
    if latency:
        out += ["## 3. Latency", "",
                "From a frame's write into the pseudo-terminal to its prediction's "
                "line read from the daemon's stdout; one stream per port, paced "
                "writer; the first 0.5 s left out. Medians over fresh runs, the "
                "range of p99 in brackets. Parts (median / p99 ms): pty = "
                "write to the daemon's read, daemon = read to prediction made, out "
                "= publisher, stdout pipe and reader.", ""]
        rows = []
        for rt, runs in latency.items():
            for r in runs:
                lat = r.get("latency_ms", {})
                pieces = r.get("latency_parts_ms", {})
                rows.append([rt, placement(r), r["ports"], _num(r["rate_hz_per_port"]),
                             _num(lat.get("median"), ".2f"),
                             _num(lat.get("p99"), ".2f") + _spread(r, ("latency_ms",
                                                                       "p99")),
                             _num(lat.get("max"), ".1f")]
                            + [f"{pieces[k]['median']:.2f} / {pieces[k]['p99']:.2f}"
                               if k in pieces else "-"
                               for k in ("to_daemon", "in_daemon", "to_reader")]
                            + [r["missing"], f"{r['cpu_cores_used']:.2f}"])
        out += _table(["runtime", "daemon on", "streams", "frames/s per stream",
                       "median ms", "p99 ms", "max ms", "pty", "daemon", "out", "lost",
                       "CPU (cores)"], rows)
    memory, ready = result.get("memory"), result.get("ready")
    if memory or ready:
        out += ["## 4. Memory and start-up", "",
                "VmRSS / VmHWM from /proc/PID/status; READY = process creation to "
                "the READY=1 datagram on NOTIFY_SOCKET (median of fresh starts).", ""]
        rows = []
        for rt in [*(memory or {}), *(r for r in (ready or {}) if r not in (memory or {}))]:
            mem = (memory or {}).get(rt, {})
            rd = (ready or {}).get(rt)

            def fmt(key, mem=mem):
                v = mem.get(key)
                return f"{v['VmRSS']:.1f} / {v['VmHWM']:.1f}" if v else "-"

            rows.append([rt, fmt("ready"), fmt("streams_1"),
                         fmt(max((k for k in mem if k.startswith("streams_")),
                                 key=lambda k: int(k.split("_")[1]),
                                 default="none")),
                         f"{rd['median_s']:.3f}" if rd else "-"])
        out += _table(["runtime", "MB at READY", "MB, 1 stream", "MB, 64 streams",
                       "READY s"], rows)
    return out


def _pick(result: dict, runtime: str) -> dict[str, float | None]:
    """The headline figure of each section for one runtime (None: not measured)."""
    figures: dict[str, float | None] = {}
    models = (result.get("step_vs_window") or {}).get("runtimes", {}).get(
        runtime, {}).get("models", [])
    first = models[0] if models else None
    if first:
        figures[f"step µs/frame ({first['cell']} {first['units']})"] = (
            first["step_s"] * 1e6)
        w100 = next((w for w in first["windows"] if w["window"] == 100), None)
        if w100:
            figures[f"window µs/frame ({first['cell']} {first['units']}, W=100)"] = (
                w100["window_s"] * 1e6)
    pipeline = (result.get("pipeline") or {}).get(runtime)
    if pipeline:
        one = next((s for s in pipeline["streams"] if s["streams"] == 1), None)
        if one:
            figures["pipeline frames/s (1 stream, one process)"] = one["pipeline_fps"]
    for t in (result.get("throughput") or {}).get(runtime, []):
        figures[f"pty predictions/s (daemon on {placement(t)})"] = t["fps"]
    for r in (result.get("latency") or {}).get(runtime, []):
        if r["rate_hz_per_port"] == LATENCY_AIM_RATE_HZ and "latency_ms" in r:
            figures[f"p99 ms, 8 x 1000 frames/s (daemon on {placement(r)})"] = (
                r["latency_ms"]["p99"])
    memory = (result.get("memory") or {}).get(runtime, {})
    biggest = max((k for k in memory if k.startswith("streams_")),
                  key=lambda k: int(k.split("_")[1]), default=None)
    if biggest:
        figures[f"VmHWM MB ({biggest.replace('_', ' ')})"] = memory[biggest]["VmHWM"]
    ready = (result.get("ready") or {}).get(runtime)
    if ready:
        figures["READY s"] = ready["median_s"]
    return figures


def _render_runtimes(result: dict) -> list[str]:
    runtimes = list(result["settings"]["runtimes"])
    if len(runtimes) != 2:
        return []
    a, b = (_pick(result, rt) for rt in runtimes)
    rows = [[name, _num(a[name], ",.2f"), _num(b.get(name), ",.2f"),
             f"{b[name] / a[name]:.2f}" if b.get(name) and a[name] else "-"]
            for name in a]
    if not rows:
        return []
    return (["## 5. Runtimes side by side", "",
             "The headline figures above, with the ratio of the second runtime to "
             "the first (below 1: smaller time or rate).", ""]
            + _table(["figure", runtimes[0], runtimes[1],
                      f"{runtimes[1]} / {runtimes[0]}"], rows))


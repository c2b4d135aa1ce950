"""edgernn's benchmark: performance figures measured side by side in one run.

Run it as ``python -m bench.run [--quick] [--out bench/results]``. The modules:

- :mod:`bench.run`: the command line and the order of the phases.
- :mod:`bench.timing`: repeated timing with a median, percentiles.
- :mod:`bench.machine`: what the figures were measured on.
- :mod:`bench.models`: (TensorFlow, child process) step and sliding-window models.
- :mod:`bench.invoke`: (no TensorFlow, child process) per-frame cost of step and
  window models, and the agreement of their predictions.
- :mod:`bench.pipeline`: (no TensorFlow, child process) the daemon's frame path in
  one process against a bare invoke loop.
- :mod:`bench.daemon_proc`: a real edgernnd process on pseudo-terminals.
- :mod:`bench.daemon_load`: throughput, latency, memory and start-up of that process.
- :mod:`bench.report`: the aims, and the Markdown table.

Absolute times depend on the machine; the figures to compare are the ratios, all
measured in the same run.
"""

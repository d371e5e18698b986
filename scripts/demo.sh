#!/usr/bin/env bash
# The demo behind `make run`: broker :9092, sidecar :8090, demo upstream :8081,
# Envoy :10000 (admin :9901), in the foreground. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=.run
TANSU=${EVENTWIRE_TANSU:?run through make run}
ENVOY=${EVENTWIRE_ENVOY:?run through make run}
SIDECAR=${EVENTWIRE_SIDECAR:?run through make run}
UPSTREAM=target/release/demo-upstream
BROKERS=127.0.0.1:9092

for port in 9092 8090 8081 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: is another demo running?" >&2
    exit 1
  fi
done

mkdir -p "$RUN/broker"
pids=()
stop() {
  trap - EXIT INT TERM
  echo; echo "stopping the demo..."
  # Envoy first so no request is left half-way, the broker last so the sidecar can flush.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped."
  exit 0
}
trap stop EXIT INT TERM

wait_port() { # port, name, log
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start; see $3:" >&2; tail -20 "$3" >&2; exit 1
}

# Tansu resolves its sqlite path against the working directory.
(cd "$RUN/broker" && exec "$TANSU" broker --listener-url tcp://$BROKERS \
  --advertised-listener-url tcp://$BROKERS --storage-engine sqlite://tansu.db) \
  >"$RUN/broker.log" 2>&1 &
pids+=($!)
wait_port 9092 broker "$RUN/broker.log"
# Tansu 0.6.0 lacks this index; without it every fetch scans all record headers.
python3 - "$RUN/broker/tansu.db" <<'PY'
import sqlite3, sys, time
for _ in range(100):
    try:
        c = sqlite3.connect(sys.argv[1], timeout=10)
        c.execute("create index if not exists header_topition_offset on header (topition, offset_id)")
        c.commit(); break
    except sqlite3.OperationalError:
        time.sleep(0.1)
PY
"$SIDECAR" topic create order-placed-events --partitions 3 --brokers $BROKERS
"$SIDECAR" topic create payment-requested-events --partitions 1 --brokers $BROKERS

# The ingest secret: generated on the first start, kept in .run/ (mode 600). The sidecar
# reads the file (and again when it changes); Envoy passes it to the filter's VM from its
# environment (vm_config.environment_variables in envoy/envoy.yaml).
SECRET_FILE="$RUN/ingest-secret"
if [ ! -s "$SECRET_FILE" ]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE"; echo >>"$SECRET_FILE")
fi

# A dashboard token for the push side and the status API (orders and payments only), made
# like the secret; the viewer link below carries it in its fragment.
TOKENS_FILE="$RUN/subscriber-tokens"
if [ ! -s "$TOKENS_FILE" ]; then
  (umask 077; printf '%s order-placed-events,payment-requested-events\n' \
     "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$TOKENS_FILE")
fi
TOKEN="$(head -n1 "$TOKENS_FILE" | cut -d' ' -f1)"

"$UPSTREAM" 127.0.0.1:8081 >"$RUN/upstream.log" 2>&1 &
pids+=($!)
"$SIDECAR" serve --listen 127.0.0.1:8090 --brokers $BROKERS --data-dir "$RUN/sidecar-data" \
  --ingest-secret-file "$SECRET_FILE" --subscriber-tokens-file "$TOKENS_FILE" \
  >"$RUN/sidecar.log" 2>&1 &
pids+=($!)
wait_port 8090 sidecar "$RUN/sidecar.log"
EVENTWIRE_INGEST_SECRET="$(head -n1 "$SECRET_FILE")" \
  "$ENVOY" -c envoy/envoy.yaml --disable-hot-restart --concurrency 1 \
  --log-level warning --component-log-level wasm:info >"$RUN/envoy.log" 2>&1 &
pids+=($!)
wait_port 10000 envoy "$RUN/envoy.log"

cat <<MSG

eventwire demo is up:
  Envoy      http://127.0.0.1:10000   (admin http://127.0.0.1:9901)
  sidecar    http://127.0.0.1:8090    (/healthz, /readyz; POST /v1/events needs the secret in $SECRET_FILE)
  upstream   http://127.0.0.1:8081
  broker     $BROKERS               (Tansu, data in $RUN/broker)

Place an order (bridge: 202 from the filter, the upstream never sees it):
  curl -i http://127.0.0.1:10000/orders -H 'content-type: application/json' \\
       -d '{"id":"ord-1001","customer":"c-42","total":99.5}'

Ask where the event is (the 202's Location header):
  curl -s http://127.0.0.1:10000/v1/events/<id from the 202> -H 'authorization: Bearer $TOKEN'

Request a payment (tap: the upstream answers, the event is published too):
  curl -i http://127.0.0.1:10000/payments -H 'content-type: application/json' \\
       -d '{"order_id":"ord-1001","amount":99.5}'

Watch orders arrive live (WebSocket through Envoy):
  http://127.0.0.1:10000/ui#token=$TOKEN
  (topic order-placed-events, then Connect; the dashboard token is in $TOKENS_FILE)

Read the topics (one CloudEvent per line):
  $SIDECAR tail --topic order-placed-events --brokers $BROKERS
  $SIDECAR tail --topic payment-requested-events --brokers $BROKERS

Metrics (per rule in Envoy's stats, the sidecar's own):
  curl -s http://127.0.0.1:9901/stats/prometheus | grep '^eventwire_'
  curl -s http://127.0.0.1:8090/metrics

Every event's trace id is the 202's traceparent (second field), in the Kafka record
(ce_traceparent), in the viewer and in the logs. Send spans to a local collector by
starting the demo with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 make run.

Logs: $RUN/{broker,sidecar,envoy,upstream}.log.  Ctrl-C stops everything.
MSG

# Stay up until Ctrl-C or until one of the processes dies.
set +e
wait -n "${pids[@]}"
echo "a demo process exited; see the logs in $RUN/" >&2

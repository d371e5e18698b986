#!/usr/bin/env bash
# The demo behind `make run`: broker :9092, sidecar :8090, demo upstream :8081, demo
# payment service :8082, Envoy :10000 (admin :9901), in the foreground. Each runs under a
# small supervisor that restarts it when it dies (with a backoff); Ctrl-C stops everything,
# Envoy first and the broker last.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=.run
TANSU=${EVENTWIRE_TANSU:?run through make run}
ENVOY=${EVENTWIRE_ENVOY:?run through make run}
SIDECAR=${EVENTWIRE_SIDECAR:?run through make run}
UPSTREAM=target/release/demo-upstream
PAYMENT=target/release/demo-payment
DELIVERIES=sidecar/deliveries.toml
BROKERS=127.0.0.1:9092
# The reply topics of the payments delivery ($DELIVERIES), shown on the dashboard too.
REPLY_TOPICS=(payment-processed-events payment-failed-events)

for port in 9092 8090 8081 8082 10000 9901; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use: is another demo running?" >&2
    exit 1
  fi
done

mkdir -p "$RUN/broker"

# supervise NAME LOG COMMAND...: runs COMMAND (output appended to LOG, its pid in
# .run/NAME.pid) and starts it again, with the same command line, whenever it exits: after
# 1 s, doubling up to 30 s while it keeps dying, back to 1 s once it stayed up 60 s. TERM
# stops it for good: COMMAND gets TERM, then KILL if it is still there 10 s later.
supervise() {
  local name=$1 log=$2; shift 2
  local child="" stopping="" restarts=0 delay=1 started status
  trap 'stopping=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true' TERM
  trap '' INT HUP # the main script handles these, and stops us with TERM
  set +e
  while :; do
    started=$SECONDS
    "$@" </dev/null >>"$log" 2>&1 &
    child=$!
    echo "$child" >"$RUN/$name.pid"
    [ -z "$stopping" ] || kill -TERM "$child" 2>/dev/null
    # (2>/dev/null: no "Killed" line from bash; the line below says it.)
    wait "$child" 2>/dev/null
    status=$?
    if [ -n "$stopping" ]; then
      for _ in $(seq 100); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
      if kill -KILL "$child" 2>/dev/null; then
        echo "demo: $name did not stop within 10 s; killed" >&2
      fi
      wait "$child" 2>/dev/null
      break
    fi
    child=""
    ((SECONDS - started < 60)) || delay=1
    restarts=$((restarts + 1))
    echo "demo: $name exited (status $status); restarting in $delay s (restart $restarts)" |
      tee -a "$log" >&2
    sleep "$delay" &
    child=$!
    wait "$child" 2>/dev/null
    child=""
    [ -z "$stopping" ] || break
    delay=$((delay * 2 > 30 ? 30 : delay * 2))
  done
  rm -f "$RUN/$name.pid"
}

# start NAME LOG COMMAND...: supervise in the background, in a process group of its own, so
# the terminal's Ctrl-C reaches only this script, which then stops each in turn.
names=()
pids=()
start() {
  : >"$2"
  set -m
  supervise "$@" &
  pids+=($!)
  set +m
  names+=("$1")
}

# shellcheck disable=SC2329 # (invoked by the traps below)
stop() { # exit status
  trap '' INT TERM HUP # a second Ctrl-C must not cut the stop short
  trap - EXIT
  echo
  printf 'stopping the demo:'
  # Envoy first so no request is left half-way, the broker last so the sidecar can flush.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
    # Whatever is left in its process group (nothing, normally).
    kill -KILL -- "-${pids[i]}" 2>/dev/null || true
    printf ' %s' "${names[i]}"
  done
  echo; echo "stopped."
  exit "$1"
}
trap 'stop $?' EXIT
trap 'stop 0' INT TERM HUP

wait_port() { # port, name, log
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start; see $3:" >&2; tail -20 "$3" >&2; exit 1
}

# Tansu resolves its sqlite path against the working directory.
start broker "$RUN/broker.log" env -C "$RUN/broker" "$TANSU" broker \
  --listener-url tcp://$BROKERS --advertised-listener-url tcp://$BROKERS \
  --storage-engine sqlite://tansu.db
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
# The payments delivery's replies and dead letters ($DELIVERIES).
for topic in "${REPLY_TOPICS[@]}" order-placed-events.dlq; do
  "$SIDECAR" topic create "$topic" --partitions 1 --brokers $BROKERS
done

# The ingest secret: generated on the first start, kept in .run/ (mode 600). The sidecar
# reads the file (and again when it changes); Envoy passes it to the filter's VM from its
# environment (vm_config.environment_variables in envoy/envoy.yaml).
SECRET_FILE="$RUN/ingest-secret"
if [ ! -s "$SECRET_FILE" ]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE"; echo >>"$SECRET_FILE")
fi

# A dashboard token for the push side and the status API (orders and payments only), made
# like the secret; the viewer link below carries it in its fragment. A file from an older
# demo that does not cover every topic below is made again, with a new token.
TOKENS_FILE="$RUN/subscriber-tokens"
DASHBOARD_TOPICS=(order-placed-events payment-requested-events "${REPLY_TOPICS[@]}")
token_covers() { # topic: does the first token's list (names, or prefixes ending in *) have it?
  local list pattern patterns
  list=$(head -n1 "$TOKENS_FILE" | awk '{print $2}')
  [ -n "$list" ] || return 0 # no list: every topic
  IFS=, read -ra patterns <<<"$list"
  for pattern in "${patterns[@]}"; do
    if [[ $pattern == *'*' ]]; then [[ $1 == "${pattern%'*'}"* ]] && return 0
    else [[ $1 == "$pattern" ]] && return 0; fi
  done
  return 1
}
if [ -s "$TOKENS_FILE" ]; then
  for topic in "${DASHBOARD_TOPICS[@]}"; do
    if ! token_covers "$topic"; then
      echo "demo: $TOKENS_FILE does not cover $topic; making a new dashboard token"
      rm -f "$TOKENS_FILE"
      break
    fi
  done
fi
if [ ! -s "$TOKENS_FILE" ]; then
  (umask 077; printf '%s %s\n' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')" \
     "$(IFS=,; echo "${DASHBOARD_TOPICS[*]}")" >"$TOKENS_FILE")
fi
TOKEN="$(head -n1 "$TOKENS_FILE" | cut -d' ' -f1)"

start upstream "$RUN/upstream.log" "$UPSTREAM" 127.0.0.1:8081
start payments "$RUN/payments.log" "$PAYMENT" 127.0.0.1:8082
wait_port 8082 payments "$RUN/payments.log"
# group.instance.id: the delivery's consumer is a static member, so a restarted sidecar takes
# its own place in the group at once. Without it, after a kill -9 Tansu 0.6.0 waits for the
# dead member's session to time out (45 s), and then at times leaves the group formed with no
# partition assigned: deliveries stop until the next restart. (Producers warn that they
# ignore the property, once per start.)
start sidecar "$RUN/sidecar.log" "$SIDECAR" serve --listen 127.0.0.1:8090 --brokers $BROKERS \
  --data-dir "$RUN/sidecar-data" --ingest-secret-file "$SECRET_FILE" \
  --subscriber-tokens-file "$TOKENS_FILE" --deliveries-file "$DELIVERIES" \
  --kafka group.instance.id=eventwire-demo-sidecar
wait_port 8090 sidecar "$RUN/sidecar.log"
# The secret reaches Envoy through its environment only (not on a command line).
EVENTWIRE_INGEST_SECRET="$(head -n1 "$SECRET_FILE")" \
  start envoy "$RUN/envoy.log" "$ENVOY" -c envoy/envoy.yaml --disable-hot-restart \
  --concurrency 1 --log-level warning --component-log-level wasm:info
wait_port 10000 envoy "$RUN/envoy.log"

cat <<MSG

eventwire demo is up:
  Envoy      http://127.0.0.1:10000   (admin http://127.0.0.1:9901)
  sidecar    http://127.0.0.1:8090    (/healthz, /readyz; POST /v1/events needs the secret in $SECRET_FILE)
  upstream   http://127.0.0.1:8081
  payments   http://127.0.0.1:8082    (demo payment service; the sidecar delivers orders to it: $DELIVERIES)
  broker     $BROKERS               (Tansu, data in $RUN/broker)

Place an order (bridge: 202 from the filter, the upstream never sees it):
  curl -i http://127.0.0.1:10000/orders -H 'content-type: application/json' \\
       -d '{"id":"ord-1001","customer":"c-42","total":99.5}'

The sidecar delivers it to the payment service (POST /payments, a line in $RUN/payments.log),
whose answer is a CloudEvent that the sidecar publishes as the reply, keyed by the order id,
with causationid = the order event's id: com.example.payment.processed on
payment-processed-events, or com.example.payment.failed on payment-failed-events (about one
order in ten is declined, always the same ones: try "id":"ord-1010"):
  $SIDECAR tail --topic payment-processed-events --brokers $BROKERS
  $SIDECAR tail --topic payment-failed-events --brokers $BROKERS
An order the service cannot use (here: no total) gets a 400 and is dead-lettered:
  curl -i http://127.0.0.1:10000/orders -H 'content-type: application/json' -d '{"id":"ord-1002"}'
  $SIDECAR tail --topic order-placed-events.dlq --brokers $BROKERS

Ask where the event is (the 202's Location header):
  curl -s http://127.0.0.1:10000/v1/events/<id from the 202> -H 'authorization: Bearer $TOKEN'

Request a payment (tap: the upstream answers, the event is published too):
  curl -i http://127.0.0.1:10000/payments -H 'content-type: application/json' \\
       -d '{"order_id":"ord-1001","amount":99.5}'

Watch events arrive live (WebSocket through Envoy): orders, or the payment replies
  http://127.0.0.1:10000/ui#token=$TOKEN
  http://127.0.0.1:10000/ui?topic=payment-processed-events&from=earliest&connect=1#token=$TOKEN
  (or type the topic in the form, then Connect; the dashboard token is in $TOKENS_FILE and
  covers ${DASHBOARD_TOPICS[*]})

Read the topics (one CloudEvent per line):
  $SIDECAR tail --topic order-placed-events --brokers $BROKERS
  $SIDECAR tail --topic payment-requested-events --brokers $BROKERS

Metrics (per rule in Envoy's stats, the sidecar's own):
  curl -s http://127.0.0.1:9901/stats/prometheus | grep '^eventwire_'
  curl -s http://127.0.0.1:8090/metrics

Every event's trace id is the 202's traceparent (second field), in the Kafka record
(ce_traceparent), in the viewer and in the logs. Send spans to a local collector by
starting the demo with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 make run.

A process that dies is started again (a "demo: ... restarting" line here and in its log);
try it on the sidecar, then place another order:
  kill -9 \$(cat $RUN/sidecar.pid)

Logs: $RUN/{broker,sidecar,envoy,upstream,payments}.log.  Ctrl-C stops everything.
MSG

# Stay up until Ctrl-C (or TERM); the supervisors keep the processes running.
set +e
wait
echo "every demo process is gone; see the logs in $RUN/" >&2
exit 1

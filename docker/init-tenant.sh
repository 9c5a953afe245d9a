#!/usr/bin/env bash
# One-shot init job of docker-compose.yml: creates the tenant and its main timeline with the fixed
# ids that docker/compute-spec.json uses, on the pageserver and on every safekeeper -- what
# `neon_local tenant create` does (control_plane/src/env.rs create_tenant). Idempotent: whatever
# already exists is left alone, so `docker compose up` can run it again on every start.
#
# Environment: TENANT_ID, TIMELINE_ID, PAGESERVER_HTTP (http://pageserver:9898),
# SAFEKEEPERS_HTTP (space-separated http://safekeeperN:7676 URLs).
set -euo pipefail
: "${TENANT_ID:?}" "${TIMELINE_ID:?}" "${PAGESERVER_HTTP:?}" "${SAFEKEEPERS_HTTP:?}"

curl_() { curl -sS --max-time 180 "$@"; }
# HTTP status of a GET (000 if the server is unreachable).
status() { curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$1" || true; }
# The value of a string field in a flat JSON answer (no jq in the image).
field() { sed -n "s/.*\"$1\" *: *\"\([^\"]*\)\".*/\1/p"; }

ps_tl="$PAGESERVER_HTTP/v1/tenant/$TENANT_ID/timeline/$TIMELINE_ID"

if [ "$(status "$PAGESERVER_HTTP/v1/tenant/$TENANT_ID")" != 200 ]; then
  echo "creating tenant $TENANT_ID on the pageserver"
  curl_ -f -X POST -H 'Content-Type: application/json' \
    -d "{\"tenant_id\": \"$TENANT_ID\"}" "$PAGESERVER_HTTP/v1/tenant"
  echo
fi

if [ "$(status "$ps_tl")" != 200 ]; then
  echo "creating timeline $TIMELINE_ID on the pageserver (initdb)"
  curl_ -f -X POST -H 'Content-Type: application/json' \
    -d "{\"new_timeline_id\": \"$TIMELINE_ID\"}" "$PAGESERVER_HTTP/v1/tenant/$TENANT_ID/timeline"
  echo
fi

# The safekeepers' timelines start where the pageserver's does (its initdb LSN, before any compute
# has written).
start_lsn=$(curl_ -f "$ps_tl" | field last_record_lsn)
[ -n "$start_lsn" ] || { echo "no last_record_lsn in $ps_tl" >&2; exit 1; }

for sk in $SAFEKEEPERS_HTTP; do
  if [ "$(status "$sk/v1/tenant/$TENANT_ID/timeline/$TIMELINE_ID")" = 200 ]; then
    echo "$sk: timeline exists"
    continue
  fi
  echo "$sk: creating timeline $TIMELINE_ID at $start_lsn"
  curl_ -f -X POST -H 'Content-Type: application/json' \
    -d "{\"timeline_id\": \"$TIMELINE_ID\", \"start_lsn\": \"$start_lsn\", \"pg_version\": 150018}" \
    "$sk/v1/tenant/$TENANT_ID/timeline"
  echo
done
echo "tenant $TENANT_ID timeline $TIMELINE_ID ready"

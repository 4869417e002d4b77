#!/bin/sh
# Restarts this node's agent process (the supervisor in skein-node-entrypoint starts it
# again); the kernel's rules, routes and the running apps stay. Waits until the new agent
# answers its API, or fails after SKEIN_RESTART_TIMEOUT seconds (default 30).
set -eu
old=$(cat /run/skein-agent.pid)
kill -TERM "$old"
deadline=$(( $(date +%s) + ${SKEIN_RESTART_TIMEOUT:-30} ))
while :; do
    new=$(cat /run/skein-agent.pid 2>/dev/null || true)
    if [ -n "$new" ] && [ "$new" != "$old" ] && skein version >/dev/null 2>&1; then
        echo "agent restarted (pid $old -> $new)"
        exit 0
    fi
    [ "$(date +%s)" -lt "$deadline" ] || { echo "agent not back after restart" >&2; exit 1; }
    sleep 0.2
done

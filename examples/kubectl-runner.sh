#!/bin/sh
# A tasklease runner written with nothing but kubectl and a POSIX shell.
#
# The whole lease protocol from the runner's side is three kinds of fenced JSON patches on
# the Task's status subresource: the first progress report (the acknowledgement), more
# progress reports (heartbeats, from a background loop), and the result. Every patch first
# `test`s the Task's epoch and holder annotations, so the API server itself refuses the
# write of a runner whose lease was handed to another pod. A patch refused because a `test`
# failed (or a Task that is gone) means: stop. Any other failure (a 403 while the API
# server starts, a timeout) is tried again; but a runner that has delivered no report for
# spec.reportProgressTimeout stops by itself, since the task may be another pod's by then.
#
# Environment (set by the operator in the runner pod):
#   TASKLEASE_TASK, TASKLEASE_NAMESPACE, TASKLEASE_EPOCH, TASKLEASE_POD_NAME
# Task parameters this example understands (spec.parameters, strings):
#   steps        how many steps of "work" (default 3)
#   stepSeconds  how long each step takes (default 1)
#   failWith     if set, end with result FAILED and this errorId instead of FINISHED
# Needs RBAC: get on tasks, patch on tasks/status in the Task's namespace.
#
# Exit codes: 0 FINISHED written; 1 FAILED written, or the result could not be delivered;
# 2 not started by the operator; 143 the lease was lost or the task cancelled (nothing
# more is written).
set -u

say() { echo "kubectl-runner: $*" >&2; }

for name in TASKLEASE_TASK TASKLEASE_NAMESPACE TASKLEASE_EPOCH TASKLEASE_POD_NAME; do
    eval "value=\${$name:-}"
    if [ -z "$value" ]; then
        say "$name is not set: run me in a runner pod the operator created"
        exit 2
    fi
done

STATE=$(mktemp -d "${TMPDIR:-/tmp}/kubectl-runner.XXXXXX") || exit 1
HEARTBEAT_PID=
ROLE=main # "main" or "heartbeat": which process writes (their reports must differ)
BEATS=0
cleanup() {
    if [ -n "$HEARTBEAT_PID" ]; then kill "$HEARTBEAT_PID" 2>/dev/null; fi
    rm -rf "$STATE"
}
trap cleanup EXIT
trap 'say "stopping: $(cat "$STATE/lost" 2>/dev/null || echo "signalled")"; exit 143' TERM INT

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# A JSON string literal: backslashes and quotes escaped, control characters dropped.
json_string() {
    printf '"%s"' "$(printf '%s' "$1" | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')"
}

# Whole seconds (at least 1) of a Go duration such as 60s, 1m30s, 1.5s or 500ms.
duration_seconds() {
    echo "$1" | awk '{
        rest = $0; total = 0
        while (match(rest, /^[0-9.]+(h|ms|m|s)/)) {
            token = substr(rest, 1, RLENGTH); rest = substr(rest, RLENGTH + 1)
            match(token, /^[0-9.]+/); number = substr(token, 1, RLENGTH) + 0
            unit = substr(token, RLENGTH + 1)
            if (unit == "h") total += number * 3600
            else if (unit == "m") total += number * 60
            else if (unit == "s") total += number
            else if (unit == "ms") total += number / 1000
        }
        total = int(total); if (total < 1) total = 1; print total
    }'
}

# After a fenced patch: 0 delivered, 1 not delivered (try again later), 2 lease lost or
# task cancelled (the reason is in $STATE/lost). $1 is kubectl's exit code, $2 what it
# printed (spec.cancel of the patched Task).
outcome() {
    if [ "$1" -eq 0 ]; then
        date +%s >"$STATE/delivered"
        if [ "$2" = true ]; then
            echo "the task was canceled (spec.cancel)" >"$STATE/lost"
            return 2
        fi
        return 0
    fi
    error=$(cat "$STATE/err-$ROLE")
    case $error in
    # 422 "the server rejected our request": a `test` failed, the epoch or holder moved on.
    # NotFound naming this Task: the Task is gone. Nothing else proves the lease moved.
    *"rejected our request"* | *"\"$TASKLEASE_TASK\" not found"*)
        echo "lease lost, the fenced write was refused: $error" >"$STATE/lost"
        return 2
        ;;
    esac
    silent=$(($(date +%s) - $(cat "$STATE/delivered")))
    if [ "$silent" -ge "$REPORT_TIMEOUT" ]; then
        echo "no report delivered for ${silent}s (the report window): the task may be another pod's now; last error: $error" >"$STATE/lost"
        return 2
    fi
    say "report not delivered (will try again): $error"
    return 1
}

# report [PERCENT MESSAGE]: send one progress report (with arguments: new progress first).
# Every report differs from the one before (a fresh reportTime and a counter in `fields`),
# or the API server would see no change and the operator no heartbeat. One report at a time
# (a lock directory): a heartbeat that read the progress before a step's report must not
# land after it with the older progress.
report() {
    until mkdir "$STATE/lock" 2>/dev/null; do
        [ -z "${STOP:-}" ] && [ -d "$STATE" ] || return 1 # stopping, or the runner is gone
        sleep 1
    done
    if [ $# -ge 2 ]; then
        printf '"percent":%s,"message":%s' "$1" "$(json_string "$2")" >"$STATE/progress.new"
        mv "$STATE/progress.new" "$STATE/progress"
    fi
    BEATS=$((BEATS + 1))
    cancel=$(kubectl patch task "$TASKLEASE_TASK" -n "$TASKLEASE_NAMESPACE" --subresource=status --type=json -o 'jsonpath={.spec.cancel}' -p '[{"op":"test","path":"/metadata/annotations/tasklease.io~1epoch","value":"'"$TASKLEASE_EPOCH"'"},{"op":"test","path":"/metadata/annotations/tasklease.io~1holder","value":"'"$TASKLEASE_POD_NAME"'"},{"op":"add","path":"/status/progress","value":{"epoch":'"$TASKLEASE_EPOCH"','"$(cat "$STATE/progress")"',"reportTime":"'"$(now)"'","fields":{"beat":"'"$ROLE-$BEATS"'"}}}]' 2>"$STATE/err-$ROLE")
    delivered=$?
    rmdir "$STATE/lock"
    outcome "$delivered" "$cancel"
}

# set_result FINISHED | set_result FAILED ERROR_ID MESSAGE (retried when not delivered).
set_result() {
    if [ -n "$HEARTBEAT_PID" ]; then
        kill "$HEARTBEAT_PID" 2>/dev/null
        wait "$HEARTBEAT_PID" 2>/dev/null
        HEARTBEAT_PID=
    fi
    if [ "$1" = FINISHED ]; then
        result='{"epoch":'"$TASKLEASE_EPOCH"',"status":"FINISHED","reportTime":"'"$(now)"'"}'
    else
        result='{"epoch":'"$TASKLEASE_EPOCH"',"status":"FAILED","errorId":'"$(json_string "$2")"',"errorMessage":'"$(json_string "$3")"',"reportTime":"'"$(now)"'"}'
    fi
    for delay in 1 2 4 8 0; do
        kubectl patch task "$TASKLEASE_TASK" -n "$TASKLEASE_NAMESPACE" --subresource=status --type=json -o name -p '[{"op":"test","path":"/metadata/annotations/tasklease.io~1epoch","value":"'"$TASKLEASE_EPOCH"'"},{"op":"test","path":"/metadata/annotations/tasklease.io~1holder","value":"'"$TASKLEASE_POD_NAME"'"},{"op":"add","path":"/status/result","value":'"$result"'}]' >/dev/null 2>"$STATE/err-$ROLE"
        outcome $? ""
        case $? in
        0) return 0 ;;
        2) return 2 ;;
        esac
        [ "$delay" -gt 0 ] && sleep "$delay"
    done
    return 1
}

# The background heartbeat: report every spec.heartbeatInterval; on a refusal, stop the
# main process (its TERM trap exits 143). TERM (from set_result) ends it between reports,
# never during one, so no heartbeat lands after the result.
heartbeat() {
    ROLE=heartbeat
    BEATS=0
    STOP=
    trap 'STOP=yes' TERM
    while [ -z "$STOP" ]; do
        sleep "$INTERVAL" &
        SLEEP_PID=$!
        wait "$SLEEP_PID"
        if [ -n "$STOP" ]; then
            kill "$SLEEP_PID" 2>/dev/null
            exit 0
        fi
        report
        if [ $? -eq 2 ]; then
            kill -TERM "$MAIN_PID"
            exit 0
        fi
    done
}

# Read the Task once: the heartbeat interval and this example's parameters.
settings=
for delay in 1 2 4 0; do
    settings=$(kubectl get task "$TASKLEASE_TASK" -n "$TASKLEASE_NAMESPACE" -o 'jsonpath={.spec.heartbeatInterval}|{.spec.reportProgressTimeout}|{.spec.ackTimeout}|{.spec.parameters.steps}|{.spec.parameters.stepSeconds}|{.spec.parameters.failWith}') && break
    [ "$delay" -gt 0 ] && sleep "$delay"
done
[ -n "$settings" ] || { say "cannot read task $TASKLEASE_TASK"; exit 1; }
IFS='|' read -r interval report_timeout ack_timeout steps step_seconds fail_with <<EOF
$settings
EOF
INTERVAL=$(duration_seconds "${interval:-60s}")
# Until the first report the window is spec.ackTimeout from now; then reportProgressTimeout.
REPORT_TIMEOUT=$(duration_seconds "${ack_timeout:-2m}")
date +%s >"$STATE/delivered"
STEPS=${steps:-3}
STEP_SECONDS=${step_seconds:-1}

# 1. Acknowledge: the first report carrying our epoch (retried if not delivered).
acknowledged=
for delay in 1 2 4 0; do
    report 0 "started"
    case $? in
    0) acknowledged=yes && break ;;
    2) say "$(cat "$STATE/lost")"; exit 143 ;;
    esac
    [ "$delay" -gt 0 ] && sleep "$delay"
done
[ -n "$acknowledged" ] || { say "could not acknowledge the lease"; exit 1; }
say "acknowledged task $TASKLEASE_TASK (epoch $TASKLEASE_EPOCH), heartbeat every ${INTERVAL}s"
REPORT_TIMEOUT=$(duration_seconds "${report_timeout:-15m}")

# 2. Heartbeat in the background while the work runs.
MAIN_PID=$$
heartbeat &
HEARTBEAT_PID=$!

# 3. The work: report progress after each step. `sleep & wait` lets the TERM trap (sent
# by the heartbeat on a lost lease) interrupt a step at once.
step=0
while [ "$step" -lt "$STEPS" ]; do
    sleep "$STEP_SECONDS" &
    wait $!
    step=$((step + 1))
    report $((step * 100 / STEPS)) "step $step of $STEPS"
    if [ $? -eq 2 ]; then
        say "stopping: $(cat "$STATE/lost")"
        exit 143
    fi
done

# 4. The result.
if [ -n "$fail_with" ]; then
    set_result FAILED "$fail_with" "failed on purpose after $STEPS steps (parameter failWith)"
    status=$?
    [ "$status" -eq 2 ] && { say "$(cat "$STATE/lost")"; exit 143; }
    exit 1
fi
set_result FINISHED
case $? in
0) say "reported FINISHED"; exit 0 ;;
2) say "$(cat "$STATE/lost")"; exit 143 ;;
*) say "the result could not be delivered"; exit 1 ;;
esac

# vqkvd.sh -- shell functions the scripts that run a vqkvd of their own
# share (sourced by tools/demo.sh, bench/serve.sh and examples/run.sh, which
# set $build to the build directory and $vqkvd_who to their own name for
# messages). Both exit the calling script on failure.

# vqkvd_wait_ready PID SOCKET: returns once `vqkvctl health` answers on
# SOCKET. Fails when PID died, or after a minute: only a guard against a
# daemon that hangs at start (ASan builds start slowly).
vqkvd_wait_ready() {
    tries=0
    until "$build/client/vqkvctl" --socket "$2" health >/dev/null 2>&1; do
        if ! kill -0 "$1" 2>/dev/null; then
            echo "$vqkvd_who: vqkvd exited at start" >&2
            exit 1
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 600 ]; then
            echo "$vqkvd_who: vqkvd did not answer on $2" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# vqkvd_terminate PID: SIGTERM, and vqkvd must exit 0 (a clean stop: every
# client closed, nothing leaked under ASan).
vqkvd_terminate() {
    kill -TERM "$1"
    status=0
    wait "$1" || status=$?
    if [ "$status" -ne 0 ]; then
        echo "$vqkvd_who: vqkvd exited with status $status" >&2
        exit 1
    fi
}

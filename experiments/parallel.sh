#!/usr/bin/env bash
# Run one experiment sweep as one process per architecture, side by side on one GPU.
#
#   experiments/parallel.sh mqar|lm|length|ruler OUT [more arguments for the script]
#   experiments/parallel.sh mqar OUT --per-cell --cells T:K,... [more arguments]
#
# The models of these sweeps are small (0.8-25M parameters), so one process leaves most of an H200 idle
# between its kernel launches; several processes fill those gaps. Every run is seeded, so what a finished
# run computes does not depend on it, but the wall times each JSON records are shared-GPU times, and a run is
# slower side by side: its --max-minutes guard (each process keeps its own) may stop it where it would have
# finished alone. Such a run saves its training state (OUT/<name>.partial.pt) and the next invocation
# continues it; a run out of memory is recorded as "error" (delete the file to retry). More than about five
# processes do not add throughput on an H200. Logs go to OUT-logs/<name>.log. Prints DONE when every process
# printed DONE, otherwise INCOMPLETE (re-run the same command to continue: finished configurations are
# skipped). With --plan each process lists
# what it would run. PYTHON names the interpreter (default: python). With --per-cell (mqar only, with --cells
# and a single --lrs value, so that no cell waits on a learning-rate sweep) each architecture runs one process
# per cell: more processes side by side, for long runs that would not fit one call one after the other.
set -u
if [ $# -lt 2 ]; then
    echo "usage: $0 mqar|lm|length|ruler OUT [arguments for the script]" >&2
    exit 2
fi
script=$1 out=${2%/}
shift 2
per_cell=0 cells="" lrs="" args=() rest=() prev=""
for arg in "$@"; do
    case $prev in --cells) cells=$arg ;; --lrs) lrs=$arg ;; esac
    case $arg in --cells=*) cells=${arg#--cells=} ;; --lrs=*) lrs=${arg#--lrs=} ;; esac
    if [ "$arg" = --per-cell ]; then
        per_cell=1
    else
        args+=("$arg")  # every argument for the script
        case $prev:$arg in --cells:* | *:--cells | *:--cells=*) ;; *) rest+=("$arg") ;; esac  # all but --cells
    fi
    prev=$arg
    case $arg in
        --out | --out=* | --archs | --archs=* | --models | --models=*)
            echo "$0: $arg is set per process by this script; run the script itself for other subsets" >&2
            exit 2
            ;;
    esac
done
case $script in
    mqar) flag=--archs names="attn rat-l16 rat-l64 rnn rat-swa" ;;
    lm) flag=--archs names="attn rat rnn attn-swa rat-swa" ;;
    length) flag=--models names="attn-swa-rope attn-swa-nope rat-swa-rope rat-swa-nope" ;;
    ruler) flag=--archs names="attn rat-l16 rat-l64 rat-swa" ;;
    *)
        echo "$0: script must be one of mqar, lm, length, ruler (got '$script')" >&2
        exit 2
        ;;
esac
if [ "$per_cell" = 1 ] && { [ "$script" != mqar ] || [ -z "$cells" ] || [ -z "$lrs" ] || [ "${lrs#*,}" != "$lrs" ]; }; then
    echo "$0: --per-cell needs the mqar script, --cells T:K,... and a single --lrs value" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out" "$out-logs"
pids=() logs=()
for name in $names; do
    if [ "$per_cell" = 1 ]; then
        for cell in ${cells//,/ }; do
            log=$out-logs/$name-${cell/:/-}.log
            OMP_NUM_THREADS=1 "${PYTHON:-python}" "$here/$script.py" --out "$out" "$flag" "$name" "${rest[@]}" \
                --cells "$cell" >"$log" 2>&1 &
            pids+=($!) logs+=("$log")
        done
    else
        log=$out-logs/$name.log
        OMP_NUM_THREADS=2 "${PYTHON:-python}" "$here/$script.py" --out "$out" "$flag" "$name" "${args[@]}" >"$log" 2>&1 &
        pids+=($!) logs+=("$log")
    fi
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
case " $* " in *" --plan "*)
    cat "${logs[@]}"
    exit "$status"
    ;;
esac
done_all=1
for log in "${logs[@]}"; do
    echo "== $(basename "$log" .log): $(tail -n 1 "$log")"
    grep -q '^DONE' "$log" || done_all=0
done
if [ "$done_all" = 1 ] && [ "$status" = 0 ]; then
    echo "DONE: every process finished its configurations"
else
    echo "INCOMPLETE (or failed: see $out-logs/); re-run the same command to continue"
    exit 1
fi

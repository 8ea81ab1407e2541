# Deadline helpers of the GPU scripts (sourced): a lent GPU comes with a fixed amount of device time,
# so every stage must end, cleanly, before it runs out. DEADLINE_S (seconds from the script's start,
# bash's SECONDS) must be set by the caller.

left() { echo $((DEADLINE_S - SECONDS)); }
# Lightning's own time limit ("DD:HH:MM:SS") for a run that must end $1 seconds before the deadline:
# it stops the run cleanly (on_train_end writes the victim / the defense), where SIGTERM would not
max_time() { local s=$(($(left) - $1)); printf '00:%02d:%02d:%02d' $((s / 3600)) $((s % 3600 / 60)) $((s % 60)); }
# run "$@" in its own process group; at the deadline (minus $1 seconds kept for later stages) TERM it
until_deadline() {
  local keep=$1
  shift
  setsid "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(left)" -le "$keep" ]; then
      echo "[gpu] deadline: SIGTERM to $*" >&2
      kill -TERM -- -"$pid" 2>/dev/null
      sleep 20
      kill -KILL -- -"$pid" 2>/dev/null
      break
    fi
    sleep 2
  done
  wait "$pid"
}

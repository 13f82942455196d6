# The guest's view of a daemon upgrade: fio randrw 4 KiB at queue depth 16 (libaio, O_DIRECT)
# runs for RUNTIME seconds per phase; the host upgrades the daemon once in each phase's middle
# (UPGRADE_AFTER seconds after the phase's `wait_host`), then releases the guest. Every request's
# latency goes to a per-I/O log (fio --write_lat_log, --log_avg_msec=0), its times counted from
# the job's start (its --exec_prerun notes the guest's uptime then). The upgrade's window is from
# UPGRADE_AFTER - 1 s after the guest asked for it to 0.2 s after the host released the guest; each
# phase reports:
#   phase-NAME ok                    fio finished with no I/O error
#   NAME slowest=MS gap=MS rest_slowest=MS rest_gap=MS window=S-S ios=N iops=N p99=MS
# where slowest is the longest request in flight during the window (submission to completion),
# gap the longest time with no request completing that overlaps the window, and rest_* the same
# for the rest of the phase (what the run shows without an upgrade).
#
# Env: PHASES (names, in order; default "live reconnect"), RUNTIME (10), UPGRADE_AFTER (4),
# SIZE_MB (64: the span of the random offsets).
dev=/dev/vda
runtime=${RUNTIME:-10}
size_mb=${SIZE_MB:-64}
upgrade_after=${UPGRADE_AFTER:-4}

for phase in ${PHASES:-live reconnect}; do
    rm -f /tmp/"$phase"_*.log /tmp/"$phase".out /tmp/"$phase".t0
    printf '#!/bin/sh\ncut -d" " -f1 /proc/uptime >/tmp/%s.t0\n' "$phase" >/tmp/"$phase".prerun
    chmod +x /tmp/"$phase".prerun
    fio --name="$phase" --filename=$dev --ioengine=libaio --direct=1 --rw=randrw --bs=4k \
        --iodepth=16 --size="${size_mb}M" --time_based --runtime="$runtime" --randrepeat=0 \
        --norandommap --write_lat_log=/tmp/"$phase" --log_avg_msec=0 \
        --exec_prerun=/tmp/"$phase".prerun \
        >/tmp/"$phase".out 2>&1 &
    fio_pid=$!
    # The host upgrades the daemon while fio runs, then releases the guest.
    tw=$(_uptime)
    wait_host "$phase" || exit 1
    t1=$(_uptime)
    if ! wait "$fio_pid"; then
        tail -n 25 /tmp/"$phase".out | sed 's/^/  | /'
        fail "phase-$phase" "fio failed"
        continue
    fi
    # When fio started its job (its prerun, just before the first request): the log's zero.
    t0=$(cat /tmp/"$phase".t0 2>/dev/null)
    log=$(ls /tmp/"$phase"_lat.*log 2>/dev/null | head -n 1)
    if [ -z "$log" ] || [ -z "$t0" ]; then
        fail "phase-$phase" "no latency log or start time"
        continue
    fi
    # Lines: time of completion (ms since fio started), latency (ns), direction, size, offset.
    # A request or a gap counts for the upgrade when its interval overlaps the window.
    stats=$(tr -d ',' <"$log" | awk -v rt="$runtime" \
        -v from="$(awk -v u="$upgrade_after" -v a="$t0" -v w="$tw" 'BEGIN { print (w - a + u - 1) * 1000 }')" \
        -v to="$(awk -v a="$t0" -v b="$t1" 'BEGIN { print (b - a + 0.2) * 1000 }')" '
        { t = $1; l = $2 / 1e6; n++
          if (t >= from && t - l <= to) { if (l > slow) slow = l } else if (l > rslow) rslow = l
          if (n > 1) {
            g = t - prev
            if (t >= from && prev <= to) { if (g > gap) gap = g } else if (g > rgap) rgap = g
          }
          prev = t
          # p99 by counting: 0.1 ms buckets up to 2 s, the rest in the last.
          b = int(l * 10); if (b > 20000) b = 20000; h[b]++ }
        END {
          want = n * 0.99; c = 0
          for (b = 0; b <= 20000; b++) { c += h[b]; if (c >= want) break }
          printf "slowest=%.1fms gap=%.0fms rest_slowest=%.1fms rest_gap=%.0fms window=%.1f-%.1fs ios=%d iops=%.0f p99=%.1fms",
                 slow, gap, rslow, rgap, from / 1000, to / 1000, n, n / rt, (b + 1) / 10 }')
    ok "phase-$phase"
    info "$phase" "$stats"
done

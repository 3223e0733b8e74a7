#!/usr/bin/env bash
# Model-checks the epoch protocol (coordinator/model/epoch.pml) with spin: every property
# on the good model, the known protocol problems (which must still be found: see
# README.md), and the known-bad variants (which must fail with a counter-example).
# Prints, per run: states stored, transitions, depth, memory, time.  Exits non-zero on
# any unexpected result.  About 100 s on 2 cores; `--deep` adds longer runs.
#
#   coordinator/model/check.sh            the CI set
#   coordinator/model/check.sh --deep     also 3 faults, faults on two members, liveness
#                                         with 2 faults, the what-if fix (about 6 min more)
#   KEEP=dir coordinator/model/check.sh   keep pan's files and trails in dir
set -euo pipefail
cd "$(dirname "$0")"
MODEL="$PWD/epoch.pml"
DEEP=0
[ "${1:-}" = "--deep" ] && DEEP=1

if ! command -v spin >/dev/null 2>&1; then
  echo "check.sh: installing spin (Debian package)"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq spin >/dev/null
fi
CC=$(command -v gcc || command -v cc) || { echo "check.sh: no C compiler" >&2; exit 1; }
echo "check.sh: $(spin -V)"

if [ -n "${KEEP:-}" ]; then WORK="$KEEP"; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
failures=0
started=$(date +%s)

# Only the fault kinds named are enabled (each at most once): CCRASH SCRASH VMFAIL DISC NET REC SLOW
only() {
  local flags="" k
  for k in CCRASH SCRASH VMFAIL DISC NET REC SLOW; do
    case " $* " in *" $k "*) ;; *) flags="$flags -DF_$k=0" ;; esac
  done
  echo "$flags"
}

# run NAME EXPECT "spin -D flags" "cc flags" "pan flags" WHAT
#   EXPECT: pass, or the text the failing assertion or cycle must contain
run() {
  local name=$1 expect=$2 dflags=$3 ccflags=$4 panflags=$5 what=$6
  local d="$WORK/$name"
  mkdir -p "$d"
  cp "$MODEL" "$d/epoch.pml"
  local t0 t1 out verdict states trans depth mem secs
  t0=$(date +%s.%N)
  (
    cd "$d"
    # shellcheck disable=SC2086
    spin $dflags -a epoch.pml >spin.log 2>&1 || { cat spin.log; exit 1; }
    # shellcheck disable=SC2086
    "$CC" -w $ccflags -DMEMLIM=6000 -o pan pan.c
    # shellcheck disable=SC2086
    nice -n 10 ./pan $panflags >pan.out 2>&1 || true
  )
  t1=$(date +%s.%N)
  out="$d/pan.out"
  states=$(awk '/states, stored/ {print $1; exit}' "$out")
  trans=$(awk '/transitions \(= / {print $1; exit}' "$out")
  depth=$(sed -n 's/.*depth reached \([0-9]*\).*/\1/p' "$out" | head -1)
  mem=$(awk '/total actual memory usage/ {print $1; exit}' "$out")
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
  local errors found
  errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$out" | head -1)
  found=$(grep -m1 -E "assertion violated|acceptance cycle|invalid end state|blocking sel|max search depth too small|memory limit|Search not completed" "$out" || true)
  if grep -qE "max search depth too small|reached -DMEMLIM|Search not completed" "$out" && [ "${errors:-1}" = 0 ]; then
    verdict="INCOMPLETE"
  elif [ "$expect" = pass ]; then
    if [ "${errors:-1}" = 0 ]; then verdict="pass"; else verdict="UNEXPECTED: $found"; fi
  else
    if [ "${errors:-0}" != 0 ] && grep -m1 -E "assertion violated|acceptance cycle" "$out" | grep -qF -- "$expect"; then
      verdict="fails as expected: $found"
    else
      verdict="UNEXPECTED: expected a violation containing '$expect', got: ${found:-none}"
    fi
  fi
  printf '%-22s %-58s states %10s  transitions %10s  depth %4s  memory %7s MB  %6s s\n' \
    "$name" "$what" "${states:-?}" "${trans:-?}" "${depth:-?}" "${mem:-?}" "$secs"
  printf '%-22s   -> %s\n' "" "$verdict"
  case "$verdict" in
    pass) ;;
    "fails as expected"*)
      # the counter-example, as the model's MSC lines
      (cd "$d" && spin -t $dflags epoch.pml 2>/dev/null | grep -E "MSC:|CYCLE" | sed 's/^ */      /; s/MSC: //') || true ;;
    *) failures=$((failures + 1)) ;;
  esac
}

# -O1 for the long runs; -O0 compiles in a third of the time for the short ones
SAFE="-O1 -DSAFETY -DNOCLAIM"
LIVE="-O1 -DNFAIR=3"
QUICK="-O0 -DSAFETY -DNOCLAIM"
QLIVE="-O0 -DNFAIR=3"
ALL="CCRASH SCRASH VMFAIL DISC NET REC SLOW"

echo
echo "== the good model (output commit strict, 3 members, 2+2 epochs, faults on member 0)"
run abce-2faults pass "-DSAFETY_ONLY -DF_TOTAL=2 -DSKIP_D" "$SAFE" "-m2000000" \
  "(a)(b)(c)(e), any 2 faults of: $ALL"
run abcd-2faults-tcp pass "-DSAFETY_ONLY -DF_TOTAL=2 -DSKIP_E -DTCP $(only CCRASH VMFAIL DISC REC)" "$SAFE" "-m2000000" \
  "(a)(b)(c)(d), FIFO network, 2 of: CCRASH VMFAIL DISC REC"
run live-1fault pass "-DF_TOTAL=1" "$LIVE" "-a -f -m2000000" \
  "liveness under weak fairness, any 1 fault"

echo
echo "== known protocol problems: spin must still find them (README.md, 'What spin found')"
run d-stale-attempt "g_paused" "-DSAFETY_ONLY -DF_TOTAL=2 -DSKIP_A -DSKIP_B -DSKIP_C -DSKIP_E $(only VMFAIL SLOW)" "$QUICK" "-m2000000" \
  "(d) a retried recovery counts the last attempt's answers"
run live-stale-attempt "acceptance cycle" "-DF_TOTAL=2 -DSKIP_D $(only VMFAIL SLOW)" "$QLIVE" "-a -f -m2000000" \
  "liveness: one slow restore, the recovery halts"
run e-paused-guest "g_paused" "-DSAFETY_ONLY -DF_TOTAL=3 -DSKIP_A -DSKIP_B -DSKIP_C -DSKIP_D $(only VMFAIL SCRASH CCRASH)" "$QUICK" "-m2000000" \
  "(e) sidecar and coordinator restart mid-recovery"

echo
echo "== known-bad variants: spin must find a counter-example"
run bad-count-commit "cinc*16" "-DSAFETY_ONLY -DF_TOTAL=1 -DTCP -DBAD_COUNT_COMMIT -DSKIP_D" "$QUICK" "-m2000000" \
  "(a) commit on N Durables counted, FIFO network"
run bad-discard "store[hm]" "-DSAFETY_ONLY -DF_TOTAL=1 -DBAD_DISCARD -DSKIP_D" "$QUICK" "-m2000000" \
  "(b) sidecar discards all not named committed"

if [ "$DEEP" = 1 ]; then
  echo
  echo "== deep runs"
  run abc-3faults-tcp pass "-DSAFETY_ONLY -DF_TOTAL=3 -DSKIP_D -DSKIP_E -DTCP $(only CCRASH SCRASH VMFAIL DISC REC)" "$SAFE -DCOLLAPSE" "-m3000000" \
    "(a)(b)(c), FIFO network, 3 of CCRASH SCRASH VMFAIL DISC REC"
  run abce-2members pass "-DSAFETY_ONLY -DF_TOTAL=2 -DFAULTY=2 -DSKIP_D" "$SAFE -DCOLLAPSE" "-m2000000" \
    "(a)(b)(c)(e), 2 faults on members 0 and 1"
  run live-2faults-tcp pass "-DF_TOTAL=2 -DEA=3 -DTCP -DSKIP_D $(only CCRASH SCRASH DISC REC)" "$LIVE -DCOLLAPSE" "-a -f -m3000000" \
    "liveness, FIFO network, 2 of CCRASH SCRASH DISC REC"
  echo
  echo "== what-if: recovery messages carry the attempt (-DFIX_ATTEMPT; not the code)"
  run fix-abcd-2faults pass "-DSAFETY_ONLY -DF_TOTAL=2 -DSKIP_E -DFIX_ATTEMPT" "$SAFE" "-m2000000" \
    "(a)(b)(c)(d), any 2 faults"
  run fix-live-vmfail-slow pass "-DF_TOTAL=2 -DEA=3 -DSKIP_D -DFIX_ATTEMPT $(only VMFAIL SLOW)" "$LIVE" "-a -f -m2000000" \
    "liveness, VM failure and a slow step"
fi

echo
echo "check.sh: $failures unexpected result(s), $(( $(date +%s) - started )) s"
[ "$failures" = 0 ]

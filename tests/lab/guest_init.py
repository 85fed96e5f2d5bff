"""The guest's /init script, kept as text so its hash keys the initramfs cache.

The guest is driven entirely by `vhd.<key>=<value>` words on the kernel command line
(dotted names are not handed to init as environment variables, so they cannot collide
with anything the kernel or busybox uses). Every outcome is printed as a `VHOSTD-...`
marker line on the serial console; `tests.lab.qemu.GuestResult` parses them.

TCP integrity framing (shared with `tests.lab.netns.tcp_peer`): a stream is SIZE random
bytes followed by the 32 hex digits of their md5 and a newline, so the receiver can
check integrity without both ends agreeing on a seed.
"""

from __future__ import annotations

MARKER_PREFIX = "VHOSTD-"

INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp

P_role=idle; P_ip=10.0.0.1/24; P_peer=10.0.0.2; P_mtu=1500; P_count=5; P_interval=0.2
P_size=8388608; P_port=5201; P_timeout=120; P_quiet=1; P_flow=both; P_tso_segs=
for w in $(cat /proc/cmdline); do
  case "$w" in
    vhd.*=*) k=${w%%=*}; k=${k#vhd.}; v=${w#*=}
      case "$k" in *[!a-z_]*) ;; *) eval "P_$k=\$v" ;; esac ;;
  esac
done

mark() { echo "VHOSTD-$*"; }
FAIL=""
fail() { [ -z "$FAIL" ] && FAIL="$*"; mark "ERROR $*"; }
finish() {
  n=$(dmesg | grep -c 'DMAR:.*fault reason')
  mark "DMAR faults=$n"
  if [ "$n" != 0 ]; then dmesg | grep 'DMAR:' | tail -n 5; fi
  if [ -z "$FAIL" ]; then mark "RESULT PASS"; else mark "RESULT FAIL $FAIL"; dmesg | tail -n 30; fi
  sync
  echo o > /proc/sysrq-trigger
  sleep 5
  exit 0
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# Centiseconds since boot ("12.05" -> 1205; the 1-prefix keeps "05" from reading as octal).
uptime_cs() { u=$(cut -d' ' -f1 /proc/uptime); echo $(( ${u%.*} * 100 + 1${u#*.} - 100 )); }

mark "BOOT uptime=$(uptime_s) role=$P_role"
[ "$P_quiet" = 1 ] && dmesg -n 1
for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m" || fail "insmod $m"
done

i=0
while [ ! -e /sys/class/net/eth0 ]; do
  i=$((i+1)); [ $i -gt 100 ] && { fail "no eth0"; finish; }
  sleep 0.1
done
ip link set lo up
# TCP sizes a TSO frame to ~1 ms of its pacing rate, at least tcp_min_tso_segs segments:
# a TCG-slow peer would otherwise make every frame 2 segments, whatever the path allows.
if [ -n "$P_tso_segs" ]; then
  echo "$P_tso_segs" > /proc/sys/net/ipv4/tcp_min_tso_segs || fail "tcp_min_tso_segs"
fi
ip link set eth0 mtu "$P_mtu" || fail "mtu $P_mtu"
ip addr add "$P_ip" dev eth0
ip link set eth0 up
mark "NET ip=$P_ip mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
mark "READY uptime=$(uptime_s)"

# Waits until the peer answers (it may boot later than us); the measured run comes after.
wait_peer() {
  end=$(( $(cut -d. -f1 /proc/uptime) + P_timeout ))
  while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    ping -c 1 -W 1 "$P_peer" >/dev/null 2>&1 && { mark "PEER up uptime=$(uptime_s)"; return 0; }
  done
  fail "peer $P_peer unreachable"; return 1
}

do_ping() {
  out=$(ping -c "$P_count" -i "$P_interval" -W 5 "$P_peer" 2>&1)
  echo "$out" | tail -n 3
  loss=$(echo "$out" | sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p')
  [ -z "$loss" ] && loss=100
  mark "PING loss=$loss"
  [ "$loss" = 0 ] || fail "ping loss $loss%"
}

# Pings every P_interval s, P_count times, and tallies the replies without judging them:
# a guest that migrates meanwhile may lose a few, and the test decides how many may go.
# Kernel warnings (a stuck TX queue, a BUG, an IOMMU fault) fail it.
ping_tally() {
  wait_peer || return
  mark "PING start count=$P_count interval=$P_interval uptime=$(uptime_s)"
  out=$(ping -c "$P_count" -i "$P_interval" -W 2 "$P_peer" 2>&1)
  echo "$out" | tail -n 2
  sent=$(echo "$out" | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
  recv=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
  dups=$(echo "$out" | sed -n 's/.* \([0-9]*\) duplicates.*/\1/p')
  loss=$(echo "$out" | sed -n 's/.* \([0-9.]*\)% packet loss.*/\1/p')
  mark "PING sent=${sent:-0} received=${recv:-0} duplicates=${dups:-0} loss=${loss:-100}"
  bad='WARNING:|BUG:|Call Trace|timed out|hung_task|virtio_net.*(error|fail)'
  warnings=$(dmesg | grep -E "$bad")
  n=0; [ -n "$warnings" ] && n=$(echo "$warnings" | wc -l)
  mark "KERNEL warnings=$n"
  if [ "$n" != 0 ]; then echo "$warnings" | tail -n 10; fail "kernel warnings"; fi
}

make_payload() {
  head -c "$P_size" /dev/urandom > /tmp/tx
  md5sum /tmp/tx | cut -c1-32 >> /tmp/tx
}

# Prints the payload size of a received stream, or -1 when its md5 trailer does not match.
check_payload() {
  total=$(stat -c %s "$1")
  n=$((total - 33))
  [ "$n" -lt 0 ] && { echo -1; return; }
  want=$(tail -c 33 "$1" | head -c 32)
  have=$(head -c "$n" "$1" | md5sum | cut -c1-32)
  if [ "$want" = "$have" ]; then echo "$n"; else echo -1; fi
}

# Receivers keep stdin open on a fifo: busybox nc exits as soon as the socket hits EOF,
# and a receiver whose stdin ended would half-close and make the sender quit early.
recv_stdin() { mkfifo "$1"; }

report_tcp() {
  st=/sys/class/net/eth0/statistics
  nic="tx_bytes=$(cat $st/tx_bytes) tx_packets=$(cat $st/tx_packets)"
  nic="$nic rx_bytes=$(cat $st/rx_bytes) rx_packets=$(cat $st/rx_packets)"
  mark "NIC $nic features=$(cat /sys/class/net/eth0/device/features)"
  if [ "$P_flow" = send ]; then  # one way: the receiver judges the stream
    mark "TCP sent=$P_size recv=0 md5_ok=na elapsed=$1 elapsed_cs=$2 flow=send"
    return
  fi
  sent=$P_size; [ "$P_flow" = recv ] && sent=0
  r=$(check_payload /tmp/rx)
  ok=0; [ "$r" = "$P_size" ] && ok=1
  [ "$r" -lt 0 ] && r=$(stat -c %s /tmp/rx)
  mark "TCP sent=$sent recv=$r md5_ok=$ok elapsed=$1 elapsed_cs=$2 flow=$P_flow"
  [ "$ok" = 1 ] || fail "tcp integrity"
}

# P_flow: both (default) moves P_size each way at once; recv / send only the client's
# upload (PORT) / the server's download (PORT+1), so packet counts show data frames alone.
tcp_server() {
  make_payload; recv_stdin /tmp/hold
  t0=$(cut -d. -f1 /proc/uptime); c0=$(uptime_cs)
  mark "TCP listening port=$P_port"
  a=; b=
  if [ "$P_flow" != send ]; then
    timeout "$P_timeout" nc -l -p "$P_port" > /tmp/rx 0<>/tmp/hold &
    a=$!
  fi
  if [ "$P_flow" != recv ]; then
    timeout "$P_timeout" nc -l -p $((P_port + 1)) < /tmp/tx > /dev/null &
    b=$!
  fi
  [ -n "$a" ] && { wait $a || fail "tcp recv (server) status $?"; }
  [ -n "$b" ] && { wait $b || fail "tcp send (server) status $?"; }
  report_tcp $(( $(cut -d. -f1 /proc/uptime) - t0 )) $(( $(uptime_cs) - c0 ))
}

# Retries until the connection is made: the server guest may still be booting.
nc_retry() {
  end=$(( $(cut -d. -f1 /proc/uptime) + P_timeout ))
  while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    if timeout "$P_timeout" nc -w 2 "$@"; then return 0; fi
    sleep 1
  done
  return 1
}

tcp_client() {
  make_payload; recv_stdin /tmp/hold
  wait_peer || return
  do_ping
  t0=$(cut -d. -f1 /proc/uptime); c0=$(uptime_cs)
  a=; b=
  if [ "$P_flow" != recv ]; then
    nc_retry "$P_peer" "$P_port" < /tmp/tx > /dev/null &
    a=$!
  fi
  if [ "$P_flow" != send ]; then
    nc_retry "$P_peer" $((P_port + 1)) > /tmp/rx 0<>/tmp/hold &
    b=$!
  fi
  [ -n "$a" ] && { wait $a || fail "tcp send (client) status $?"; }
  [ -n "$b" ] && { wait $b || fail "tcp recv (client) status $?"; }
  report_tcp $(( $(cut -d. -f1 /proc/uptime) - t0 )) $(( $(uptime_cs) - c0 ))
}

case "$P_role" in
  ping) wait_peer && do_ping ;;
  ping-tally) ping_tally ;;
  tcp-server) tcp_server ;;
  tcp-client) tcp_client ;;
  idle|serve) mark "SERVING timeout=$P_timeout"; sleep "$P_timeout" ;;
  *) fail "unknown role $P_role" ;;
esac
finish
"""

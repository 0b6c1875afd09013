#!/bin/bash
# Checks, from inside the real-kernel lab, that the lab gives the scenarios what they rely on: the GPU
# under bochs-drm with fbcon on a vtconsole, IOMMU groups, the project's Python, modprobe, and a manual
# round trip of the GPU to vfio-pci and back. With "display" and/or "libvirt" it also checks a display
# server holding the GPU under runit, and libvirtd starting a guest with the GPU passed through.
#
# Run it through the lab:  tests/lab/run -- tests/lab/smoke.sh [display] [libvirt] [all]
# A summary goes to $LAB_OUT/smoke.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

gpu=0000:00:02.0
dev=/sys/bus/pci/devices/$gpu
summary=${LAB_OUT:-/tmp}/smoke.txt
failures=0

want_display=0
want_libvirt=0
for arg in "$@"; do
  case "$arg" in
    display) want_display=1 ;;
    libvirt) want_libvirt=1 ;;
    all) want_display=1 want_libvirt=1 ;;
    *) echo "usage: $0 [display] [libvirt] [all]" >&2; exit 2 ;;
  esac
done

# Timing uses $EPOCHREALTIME, not date or bc: on the lab's emulated CPU every fork costs ~40 ms.
since() { local d=$((${EPOCHREALTIME/./} - $1)); printf '%d.%02d' $((d / 1000000)) $((d % 1000000 / 10000)); }
note() { echo "smoke: $*" | tee -a "$summary"; }
ok() { note "ok   $*"; }
bad() { note "FAIL $*"; failures=$((failures + 1)); }
check() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

# Poll a condition for at most $1 seconds.
wait_for() {
  local end=$((${EPOCHREALTIME/./} + $1 * 1000000))
  shift
  until "$@" 2>/dev/null; do
    ((${EPOCHREALTIME/./} > end)) && return 1
    sleep 0.1
  done
}

driver() { basename "$(readlink "$dev/driver" 2>/dev/null)" 2>/dev/null || true; }
driver_is() { [ "$(driver)" = "$1" ]; }
group() { basename "$(readlink "$dev/iommu_group")"; }
fbcon_vtcon() {
  local v
  for v in /sys/class/vtconsole/vtcon*; do
    grep -q "frame buffer device" "$v/name" 2>/dev/null && { echo "$v"; return 0; }
  done
  return 1
}
fbcon_bound() { local v; v=$(fbcon_vtcon) && [ "$(cat "$v/bind")" = 1 ]; }

: > "$summary"
note "kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s at start"

# --- the lab as booted --------------------------------------------------------------------------------
check "GPU $gpu is driven by bochs-drm (got '$(driver)')" driver_is bochs-drm
check "IOMMU groups present ($(ls /sys/kernel/iommu_groups | wc -l)), GPU in group $(group)" \
  test -n "$(ls /sys/kernel/iommu_groups)"
check "vtcon0 is fbcon ('$(cat /sys/class/vtconsole/vtcon0/name)') and bound" \
  bash -c 'grep -q "frame buffer device" /sys/class/vtconsole/vtcon0/name && [ "$(cat /sys/class/vtconsole/vtcon0/bind)" = 1 ]'
check "/dev/dri/card0 exists" test -c /dev/dri/card0
check "hugetlbfs mounted at /dev/hugepages" grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts
check "results share writable at \$LAB_OUT and \$LAB_HOST_OUT" \
  bash -c 'touch "$LAB_OUT/.probe" && test -e "$LAB_HOST_OUT/.probe" && rm "$LAB_OUT/.probe"'

if [ -x "$top/.venv/bin/python" ]; then
  t=${EPOCHREALTIME/./}
  check "$top/.venv/bin/python imports janus_hooks" "$top/.venv/bin/python" -c 'import janus_hooks'
  note "     (python start + import: $(since "$t") s)"
else
  note "skip no virtualenv in $top/.venv (scripts/bootstrap makes it)"
  check "/usr/bin/python3 runs" /usr/bin/python3 -c 'import json'
fi

t=${EPOCHREALTIME/./}
check "modprobe vfio-pci" modprobe vfio-pci
note "     (modprobe vfio-pci: $(since "$t") s; loaded: $(grep -o '^vfio[a-z_0-9]*' /proc/modules | sort | tr '\n' ' '))"

# --- manual round trip: bochs-drm -> vfio-pci -> bochs-drm --------------------------------------------
t=${EPOCHREALTIME/./}
vt=$(fbcon_vtcon)
echo vfio-pci > "$dev/driver_override"
echo 0 > "$vt/bind"
# bochs-drm lets go of the GPU only once fbcon is off its framebuffer and nothing holds /dev/dri/card0.
modprobe -r bochs
echo "$gpu" > /sys/bus/pci/drivers_probe
check "GPU bound to vfio-pci" driver_is vfio-pci
grp=$(group)
check "/dev/vfio/$grp appeared" wait_for 5 test -c "/dev/vfio/$grp"
check "no fbcon vtconsole while the GPU is away" bash -c '! grep -qs "frame buffer device" /sys/class/vtconsole/vtcon*/name'
note "     (to vfio-pci: $(since "$t") s)"

t=${EPOCHREALTIME/./}
# An empty driver_override lets the normal driver match again; unbind then probe gives it back.
echo > "$dev/driver_override"
echo "$gpu" > "$dev/driver/unbind"
modprobe bochs
wait_for 5 driver_is bochs-drm || echo "$gpu" > /sys/bus/pci/drivers_probe
check "GPU back on bochs-drm" wait_for 5 driver_is bochs-drm
check "fbcon vtconsole back and bound" wait_for 5 fbcon_bound
check "/dev/dri/card0 back" wait_for 5 test -c /dev/dri/card0
note "     (back to bochs-drm: $(since "$t") s)"

# --- display server under runit -------------------------------------------------------------------------
if [ "$want_display" = 1 ]; then
  t=${EPOCHREALTIME/./}
  check "display service up and holding /dev/dri/card0" "$here/display-service" start
  note "     (display server start: $(since "$t") s; holders: $("$here/display-service" holders | tr '\n' ' '))"
  t=${EPOCHREALTIME/./}
  sv down xorg
  check "sv down xorg releases /dev/dri/card0" "$here/display-service" wait-released 15
  note "     (display server stop: $(since "$t") s)"
  # The GPU leaves and comes back while the display server is down, as in a VM's life.
  vt=$(fbcon_vtcon)
  echo 0 > "$vt/bind"
  modprobe -r bochs
  modprobe bochs
  check "bochs-drm rebound" wait_for 5 driver_is bochs-drm
  t=${EPOCHREALTIME/./}
  sv up xorg
  check "sv up xorg holds /dev/dri/card0 again" "$here/display-service" wait-held 30
  note "     (display server restart: $(since "$t") s)"
fi

# --- libvirt with the GPU passed through ---------------------------------------------------------------
if [ "$want_libvirt" = 1 ]; then
  if [ "$want_display" = 1 ]; then
    "$here/display-service" stop 15
  fi
  # Hugepages first: libvirtd only sees hugetlbfs mounts that existed when it started.
  echo 64 > /proc/sys/vm/nr_hugepages
  got=$(cat /proc/sys/vm/nr_hugepages)
  check "hugepages granted ($got of 64)" test "$got" -eq 64
  t=${EPOCHREALTIME/./}
  check "libvirtd up" "$here/libvirt-up"
  note "     (virtlogd + libvirtd start: $(since "$t") s)"

  t=${EPOCHREALTIME/./}
  echo vfio-pci > "$dev/driver_override"
  vt=$(fbcon_vtcon) && echo 0 > "$vt/bind"
  modprobe -r bochs
  echo "$gpu" > /sys/bus/pci/drivers_probe
  modprobe vfio_iommu_type1
  check "GPU on vfio-pci for the guest" driver_is vfio-pci
  note "     (GPU to vfio-pci: $(since "$t") s)"

  guest_has_gpu() {
    timeout 30 virsh qemu-monitor-command "$1" --hmp 'info pci' |
      grep -A8 'VGA controller: PCI device 1234:1111' | grep -q 'id "hostdev0"'
  }
  hugepages_used() {
    awk '/^HugePages_Total/ {t=$2} /^HugePages_Free/ {f=$2} /^HugePages_Rsvd/ {r=$2} END {print t - f + r}' /proc/meminfo
  }
  for backing in plain hugepages; do
    name=lab-smoke-$backing
    xml=$(mktemp)
    extra=""
    [ "$backing" = hugepages ] && extra="<memoryBacking><hugepages/></memoryBacking>"
    cat > "$xml" <<XML
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>64</memory>
  $extra
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <video><model type='none'/></video>
    <hostdev mode='subsystem' type='pci' managed='no'>
      <source><address domain='0x0000' bus='0x00' slot='0x02' function='0x0'/></source>
    </hostdev>
  </devices>
</domain>
XML
    t=${EPOCHREALTIME/./}
    if timeout 30 virsh -q define "$xml" >/dev/null && timeout 60 virsh -q start "$name"; then
      ok "guest $name started ($(since "$t") s)"
      check "guest $name has the GPU (1234:1111 as hostdev0)" guest_has_gpu "$name"
      if [ "$backing" = hugepages ]; then
        check "guest $name uses hugepages ($(hugepages_used) in use or reserved)" test "$(hugepages_used)" -gt 0
      fi
      t=${EPOCHREALTIME/./}
      timeout 30 virsh -q destroy "$name" >/dev/null
      note "     (destroy: $(since "$t") s)"
    else
      bad "guest $name started"
      tail -n 20 "/var/log/libvirt/qemu/$name.log" 2>/dev/null || true
    fi
    timeout 30 virsh -q undefine "$name" >/dev/null || true
    rm -f "$xml"
  done

  echo > "$dev/driver_override"
  echo "$gpu" > "$dev/driver/unbind"
  modprobe bochs
  check "GPU back on bochs-drm after the guest" wait_for 5 driver_is bochs-drm
fi

note "uptime $(cut -d' ' -f1 /proc/uptime) s at end, $failures failure(s)"
[ "$failures" = 0 ]

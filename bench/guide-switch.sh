#!/bin/bash
# A single-GPU switch as popular passthrough guides script it (written here from their description, for
# the lab benchmark): stop the display manager, sleep 2, unbind the console and the framebuffer, sleep 2,
# unload the GPU driver, bind vfio-pci; and the way back. Fixed sleeps instead of checks, no journal.
# Adapted to the lab's host only where it must be: runit instead of systemctl, the bochs GPU, and sysfs
# binding instead of `virsh nodedev-detach` (a guide's hook calling libvirt back can deadlock it).
# Usage: guide-switch.sh start|stop
set -u
gpu=0000:00:02.0
case "${1:-}" in
  start)
    sv down xorg
    sleep 2
    echo 0 > /sys/class/vtconsole/vtcon0/bind
    echo efi-framebuffer.0 > /sys/bus/platform/drivers/efi-framebuffer/unbind 2>/dev/null
    sleep 2
    modprobe -r bochs
    modprobe vfio-pci
    echo vfio-pci > /sys/bus/pci/devices/$gpu/driver_override
    echo $gpu > /sys/bus/pci/drivers_probe
    ;;
  stop)
    echo $gpu > /sys/bus/pci/drivers/vfio-pci/unbind
    echo > /sys/bus/pci/devices/$gpu/driver_override
    modprobe -r vfio-pci
    modprobe bochs
    echo 1 > /sys/class/vtconsole/vtcon0/bind
    echo efi-framebuffer.0 > /sys/bus/platform/drivers/efi-framebuffer/bind 2>/dev/null
    sv up xorg
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
exit 0

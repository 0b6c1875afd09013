#!/bin/bash
# A single-GPU switch on a systemd desktop as popular passthrough guides script it (written here from their
# description, for the desktop lab benchmark): stop the display manager, sleep 2, unbind the console and
# the framebuffer, sleep 2, unload the GPU driver, bind both functions of the GPU (VGA and HDMI audio) to
# vfio-pci; and the way back, which has no sleeps and no checks. Fixed sleeps instead of checks, no journal.
# Adapted to the lab's host only where it must be: the bochs GPU, and sysfs binding instead of
# `virsh nodedev-detach` (a guide's hook calling libvirt back can deadlock it).
# Usage: guide-switch-desktop.sh start|stop
set -u
functions=(0000:00:02.0 0000:00:02.1)
case "${1:-}" in
  start)
    systemctl stop display-manager.service
    sleep 2
    echo 0 > /sys/class/vtconsole/vtcon0/bind
    echo 0 > /sys/class/vtconsole/vtcon1/bind 2>/dev/null
    echo efi-framebuffer.0 > /sys/bus/platform/drivers/efi-framebuffer/unbind 2>/dev/null
    sleep 2
    modprobe -r bochs
    modprobe vfio-pci
    for f in "${functions[@]}"; do
      echo vfio-pci > /sys/bus/pci/devices/$f/driver_override
      [ -e /sys/bus/pci/devices/$f/driver ] && echo $f > /sys/bus/pci/devices/$f/driver/unbind
      echo $f > /sys/bus/pci/drivers_probe
    done
    ;;
  stop)
    # What `virsh nodedev-reattach` does for each function: unbind, clear the override, probe again (the
    # driver module may still be loaded for another card, so loading it binds nothing).
    for f in "${functions[@]}"; do
      echo $f > /sys/bus/pci/drivers/vfio-pci/unbind
      echo > /sys/bus/pci/devices/$f/driver_override
      echo $f > /sys/bus/pci/drivers_probe
    done
    modprobe -r vfio-pci
    modprobe bochs
    echo 1 > /sys/class/vtconsole/vtcon0/bind
    echo 1 > /sys/class/vtconsole/vtcon1/bind 2>/dev/null
    echo efi-framebuffer.0 > /sys/bus/platform/drivers/efi-framebuffer/bind 2>/dev/null
    systemctl start display-manager.service
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
exit 0

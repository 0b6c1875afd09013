#!/bin/bash
# The floor of a single-GPU switch on the desktop lab's host: the guides' operations
# (bench/guide-switch-desktop.sh) with no sleeps and no checks, vfio's modules in one `modprobe -a`: what
# any tool must at least spend. Not a safe way to switch: it waits for nothing to let go of the GPU.
# Usage: floor-switch-desktop.sh start|stop
set -u
functions=(0000:00:02.0 0000:00:02.1)
case "${1:-}" in
  start)
    systemctl stop display-manager.service
    echo 0 > /sys/class/vtconsole/vtcon0/bind
    modprobe -r bochs
    modprobe -a vfio_iommu_type1 vfio_pci
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
    modprobe -r vfio_pci vfio_iommu_type1
    modprobe bochs
    echo 1 > /sys/class/vtconsole/vtcon0/bind
    systemctl start display-manager.service
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
exit 0

"""janus-hooks: transparent VFIO GPU passthrough for libvirt/QEMU."""

__version__ = "0.1.0"

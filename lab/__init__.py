"""vhost-lab: a QEMU/KVM test lab for the Linux TAP and vhost_net data paths."""

__version__ = "0.1.0"

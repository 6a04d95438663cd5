//! The parts of husk other programs of the project reuse: the image tools
//! (OCI layouts to ext4 root filesystems), which the containerd shim uses
//! to turn containerd's root filesystems into disks for the guest.

pub mod image;

//! Container images on the host: an OCI image layout (directory or tar
//! archive) becomes an ext4 file the guest mounts as a container's root
//! filesystem. [`oci`] reads and verifies the layout, [`layers`] applies the
//! layers (whiteouts, opaque directories, no escapes from the target),
//! [`rootfs`] makes and caches the ext4 image, [`writer`] writes layouts
//! (the bundled image and tests), [`busybox`] is the bundled default image,
//! and `registry` (feature `registry`) pulls images from OCI registries into
//! a content-addressed cache that reads like a local layout.
//! `husk image ...` (the husk binary's image_cmd.rs) is the command-line
//! face of all this; the containerd shim uses [`rootfs`] to make disks.

pub mod busybox;
pub mod layers;
pub mod oci;
#[cfg(feature = "registry")]
pub mod registry;
pub mod rootfs;
pub mod writer;

// The API `husk run` builds on; not every name is used by the CLI yet.
pub use oci::ImageConfig;
pub use rootfs::{rootfs_for, RootfsOptions};

#[cfg(test)]
pub mod test_utils;

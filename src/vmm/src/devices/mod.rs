//! Emulated devices. Each is reached through a [`bus::Bus`] (port I/O or
//! MMIO) from the vCPU threads; devices never know about the API or KVM.

pub mod bus;
pub mod legacy;
pub mod virtio;

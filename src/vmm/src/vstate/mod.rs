//! KVM state: the VM (memory slots, in-kernel irqchip and PIT) and its vCPUs.
//! This is the only place that talks to kvm-ioctls' VM and vCPU fds.

pub mod lazy_memory;
pub mod memory;
pub mod persist;
pub mod probe;
pub mod slots;
pub mod vcpu;
pub mod vm;

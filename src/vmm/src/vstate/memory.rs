//! Guest RAM: anonymous, private, MAP_NORESERVE mappings laid out around the
//! MMIO gap (see `arch::x86_64::layout`).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_regions;
use crate::error::Flat;

/// Errors while allocating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit this host's address space.
    #[error("guest memory of {0} bytes does not fit the host's address space")]
    TooLarge(u64),
    /// mmap refused.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: u64,
        /// The mapping error (vm-memory's message names its cause).
        source: Flat<vm_memory::mmap::FromRangesError>,
    },
}

/// Maps `mem_size` bytes of guest RAM.
pub fn create(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = ram_regions(mem_size)
        .into_iter()
        .map(|(addr, size)| {
            usize::try_from(size)
                .map(|s| (GuestAddress(addr.0), s))
                .map_err(|_| MemoryError::TooLarge(mem_size))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        size: mem_size,
        source: Flat(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{MMIO_GAP_END, MMIO_GAP_START};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn regions_follow_the_layout() {
        let m = create(64 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
        // 3 GiB of MAP_NORESERVE costs nothing until touched.
        let m = create(3 << 30).unwrap();
        let r: Vec<_> = m.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(
            r,
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (3 << 30) - MMIO_GAP_START)
            ]
        );
        assert!(!m.address_in_range(GuestAddress(MMIO_GAP_START)));
        assert!(m.address_in_range(GuestAddress(MMIO_GAP_END)));
    }
}

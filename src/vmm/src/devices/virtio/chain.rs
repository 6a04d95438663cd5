//! Descriptor chains as husk's devices read them: the direct descriptors of
//! one chain, each read from guest memory once, and an indirect descriptor
//! refused instead of followed.
//!
//! virtio-queue finds the chains (it reads the avail ring), but its chain
//! iterator follows a `VIRTQ_DESC_F_INDIRECT` descriptor into a table of up
//! to 65535 entries wherever the driver points it, whether or not
//! `VIRTIO_RING_F_INDIRECT_DESC` was negotiated. No husk device offers that
//! feature, so a driver that uses an indirect descriptor does what it could
//! not have negotiated; [`Chain`] ends the walk there with
//! [`ChainError::IndirectNotNegotiated`], which each device handles like any
//! other malformed chain (returned unused, counted). Otherwise it walks as
//! virtio-queue does: at most queue-size descriptors (so a loop ends), none
//! past a `next` outside the table, and nothing past 4 GiB in total.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// Why a chain's walk stopped short.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor points to an indirect table, a feature the device does
    /// not offer.
    #[error("indirect descriptor, and VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
}

/// The descriptors of one chain the driver made available, in order.
///
/// An iterator of `Ok(descriptor)`; an indirect descriptor yields one
/// `Err` and ends it. Reaching the end of the chain, a loop (queue-size
/// descriptors), an unreadable descriptor or 4 GiB in total end it quietly,
/// as in virtio-queue: the device then sees a chain that fails its own checks.
#[derive(Debug, Clone)]
pub struct Chain<'m> {
    mem: &'m GuestMemoryMmap,
    table: GuestAddress,
    size: u16,
    head: u16,
    next: u16,
    ttl: u16,
    bytes: u32,
}

impl<'m> Chain<'m> {
    /// The chain starting at descriptor `head` of a table of `size` entries
    /// at `table`.
    pub fn new(mem: &'m GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Self {
        Chain {
            mem,
            table,
            size,
            head,
            next: head,
            ttl: size,
            bytes: 0,
        }
    }

    /// The index of the chain's first descriptor (what goes in the used ring).
    pub fn head_index(&self) -> u16 {
        self.head
    }

    fn end(&mut self) -> Option<Result<Descriptor, ChainError>> {
        self.ttl = 0;
        None
    }
}

impl Iterator for Chain<'_> {
    type Item = Result<Descriptor, ChainError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ttl == 0 || self.next >= self.size {
            return self.end();
        }
        let Some(addr) = self
            .table
            .0
            .checked_add(u64::from(self.next) * DESC_SIZE)
            .map(GuestAddress)
        else {
            return self.end();
        };
        // One read: what is checked below is what the device uses, whatever
        // the driver writes to the table meanwhile.
        let Ok(desc) = self.mem.read_obj::<Descriptor>(addr) else {
            return self.end();
        };
        if desc.refers_to_indirect_table() {
            self.ttl = 0;
            return Some(Err(ChainError::IndirectNotNegotiated));
        }
        // Drivers must not make chains longer than 4 GiB (virtio 1.2, 2.7.5.2).
        let Some(bytes) = self.bytes.checked_add(desc.len()) else {
            return self.end();
        };
        self.bytes = bytes;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(Ok(desc))
    }
}

/// Pops the next chain the driver made available on `queue`, to be walked
/// with [`Chain`] (never with virtio-queue's iterator).
pub fn pop<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Option<Chain<'m>> {
    let head = queue.pop_descriptor_chain(mem)?.head_index();
    Some(Chain::new(
        mem,
        GuestAddress(queue.desc_table()),
        queue.size(),
        head,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{d, mem, write_table, INDIRECT, NEXT, WRITE};

    fn walk(m: &GuestMemoryMmap, size: u16, head: u16) -> Vec<Result<(u64, u32), ChainError>> {
        Chain::new(m, GuestAddress(0), size, head)
            .map(|r| r.map(|d| (d.addr().0, d.len())))
            .collect()
    }

    #[test]
    fn a_direct_chain_yields_its_descriptors_in_order() {
        let m = mem();
        write_table(
            &m,
            0,
            &[
                d(0x1000, 10, NEXT, 2),
                d(0x9000, 1, 0, 0),
                d(0x2000, 20, NEXT | WRITE, 1),
            ],
        );
        assert_eq!(
            walk(&m, 16, 0),
            vec![Ok((0x1000, 10)), Ok((0x2000, 20)), Ok((0x9000, 1))]
        );
        assert_eq!(Chain::new(&m, GuestAddress(0), 16, 2).head_index(), 2);
    }

    #[test]
    fn an_indirect_descriptor_is_refused_and_never_followed() {
        let m = mem();
        // The table it names holds a perfectly good buffer.
        let len = write_table(&m, 0x8000, &[d(0x3000, 64, WRITE, 0)]);
        write_table(
            &m,
            0,
            &[d(0x1000, 16, NEXT, 1), d(0x8000, len, INDIRECT, 0)],
        );
        assert_eq!(
            walk(&m, 16, 0),
            vec![Ok((0x1000, 16)), Err(ChainError::IndirectNotNegotiated)]
        );
        // As the head, with NEXT set too: refused all the same, and the
        // walk ends there.
        write_table(&m, 0, &[d(0x8000, len, INDIRECT | NEXT, 1)]);
        assert_eq!(
            walk(&m, 16, 0),
            vec![Err(ChainError::IndirectNotNegotiated)]
        );
    }

    #[test]
    fn loops_bad_indices_and_4_gib_end_the_walk() {
        let m = mem();
        // 0 -> 1 -> 0 -> ...: at most the queue size.
        write_table(&m, 0, &[d(0x1000, 1, NEXT, 1), d(0x2000, 1, NEXT, 0)]);
        assert_eq!(walk(&m, 4, 0).len(), 4);
        // A next outside the table ends it.
        write_table(&m, 0, &[d(0x1000, 1, NEXT, 9)]);
        assert_eq!(walk(&m, 4, 0), vec![Ok((0x1000, 1))]);
        // A head outside the table: nothing.
        assert!(walk(&m, 4, 4).is_empty());
        // More than 4 GiB in total: the descriptor that passes it is not
        // yielded.
        write_table(&m, 0, &[d(0x1000, u32::MAX, NEXT, 1), d(0x2000, 1, 0, 0)]);
        assert_eq!(walk(&m, 4, 0), vec![Ok((0x1000, u32::MAX))]);
        // A table outside guest memory: nothing.
        let far = Chain::new(&m, GuestAddress(u64::MAX - 8), 4, 0).count();
        assert_eq!(far, 0);
    }
}

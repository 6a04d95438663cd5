//! The spare drives of a pod's VM and who uses them. The VM boots with
//! `drive_slots` writable drives (a container's writable layer, its whole
//! rootfs when copied, its volumes) and `image_slots` read-only ones (an
//! image's shared layers, one slot for every container of that image),
//! each backed by an empty placeholder until a container needs it. Which
//! slot holds what is kept here; changing a slot's backing file is the
//! VM's (`PATCH /drives`), passed in as `swap`.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::pod::PodDir;
use crate::vm::VmError;

/// A spare drive as the VM is booted with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSpec {
    /// Its drive id (the disk's serial in the guest).
    pub id: String,
    /// Read-only: an image's layers, shareable by several containers.
    pub read_only: bool,
    /// Its backing file when empty.
    pub placeholder: PathBuf,
}

/// The drive id of writable slot `n`.
pub fn slot_id(n: u32) -> String {
    format!("slot{n}")
}

/// The drive id of read-only image slot `n`.
pub fn image_slot_id(n: u32) -> String {
    format!("image{n}")
}

/// The spare drives a VM of `config` gets, writable ones first.
pub fn layout(config: &Config, dir: &PodDir) -> Vec<SlotSpec> {
    let writable = (0..config.drive_slots).map(|n| (slot_id(n), false));
    let read_only = (0..config.image_slots).map(|n| (image_slot_id(n), true));
    writable
        .chain(read_only)
        .map(|(id, read_only)| SlotSpec {
            placeholder: dir.slot_placeholder(&id),
            id,
            read_only,
        })
        .collect()
}

/// Why a disk could not be put in or taken out of a slot.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Every writable slot holds a container's disk.
    #[error("all {0} drive slots are in use (raise drive_slots in /etc/husk/config.toml)")]
    NoSlot(usize),
    /// Every read-only slot holds another image's layers.
    #[error("all {0} image slots hold other images' layers")]
    NoImageSlot(usize),
    /// The VM did not take the new backing file.
    #[error("cannot point drive {drive} at {}", image.display())]
    Swap {
        /// The slot's drive id.
        drive: String,
        /// The backing file.
        image: PathBuf,
        /// Why.
        #[source]
        source: Box<VmError>,
    },
}

/// Points a drive at a backing file.
pub type Swap<'a> = &'a dyn Fn(&str, &Path) -> Result<(), VmError>;

#[derive(Debug)]
struct Slot {
    spec: SlotSpec,
    /// The image it holds, if any.
    image: Option<PathBuf>,
    /// Who uses it: container ids (or a container's volumes key).
    owners: Vec<String>,
}

/// Which slot holds what, for whom.
#[derive(Debug)]
pub struct Slots {
    slots: Vec<Slot>,
}

impl Slots {
    /// The slots of a freshly booted VM: all empty.
    pub fn new(specs: &[SlotSpec]) -> Slots {
        Slots {
            slots: specs
                .iter()
                .map(|spec| Slot {
                    spec: spec.clone(),
                    image: None,
                    owners: Vec::new(),
                })
                .collect(),
        }
    }

    fn count(&self, read_only: bool) -> usize {
        self.slots
            .iter()
            .filter(|s| s.spec.read_only == read_only)
            .count()
    }

    /// Puts `image` into a free writable slot for `owner`; returns the
    /// slot's drive id. A slot whose swap failed stays free.
    pub fn attach(&mut self, owner: &str, image: &Path, swap: Swap) -> Result<String, SlotError> {
        let total = self.count(false);
        let slot = self
            .slots
            .iter_mut()
            .find(|s| !s.spec.read_only && s.owners.is_empty())
            .ok_or(SlotError::NoSlot(total))?;
        fill(slot, image, swap)?;
        slot.owners.push(owner.to_string());
        Ok(slot.spec.id.clone())
    }

    /// Gives `owner` a read-only slot holding `image` (an image's
    /// layers): the one that holds it already, shared, or a free one;
    /// returns the slot's drive id.
    pub fn attach_shared(
        &mut self,
        owner: &str,
        image: &Path,
        swap: Swap,
    ) -> Result<String, SlotError> {
        let total = self.count(true);
        if let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.spec.read_only && s.image.as_deref() == Some(image))
        {
            slot.owners.push(owner.to_string());
            return Ok(slot.spec.id.clone());
        }
        let slot = self
            .slots
            .iter_mut()
            .find(|s| s.spec.read_only && s.owners.is_empty())
            .ok_or(SlotError::NoImageSlot(total))?;
        fill(slot, image, swap)?;
        slot.owners.push(owner.to_string());
        Ok(slot.spec.id.clone())
    }

    /// Releases every slot `owner` uses; a slot nobody uses any more gets
    /// its placeholder back. One whose swap fails keeps `owner` (it still
    /// holds the image, so it is not handed out again).
    pub fn detach(&mut self, owner: &str, swap: Swap) -> Result<(), SlotError> {
        let mut result = Ok(());
        for slot in self.slots.iter_mut() {
            let before = slot.owners.len();
            slot.owners.retain(|o| o != owner);
            if slot.owners.len() == before || !slot.owners.is_empty() {
                continue;
            }
            let placeholder = slot.spec.placeholder.clone();
            match swap(&slot.spec.id, &placeholder) {
                Ok(()) => slot.image = None,
                Err(source) => {
                    slot.owners.push(owner.to_string());
                    result = Err(SlotError::Swap {
                        drive: slot.spec.id.clone(),
                        image: placeholder,
                        source: Box::new(source),
                    });
                }
            }
        }
        result
    }

    /// The drives in use: drive id to the containers on it, each once
    /// (`container_of` turns an owner into its container's id).
    pub fn drive_users(
        &self,
        container_of: impl Fn(&str) -> &str,
    ) -> std::collections::BTreeMap<String, Vec<String>> {
        self.slots
            .iter()
            .filter(|s| !s.owners.is_empty())
            .map(|s| {
                let mut ids: Vec<String> = s
                    .owners
                    .iter()
                    .map(|o| container_of(o).to_string())
                    .collect();
                ids.sort();
                ids.dedup();
                (s.spec.id.clone(), ids)
            })
            .collect()
    }

    /// The owners of each slot, in slot order.
    #[cfg(test)]
    pub fn owners(&self) -> Vec<(String, Vec<String>)> {
        self.slots
            .iter()
            .map(|s| (s.spec.id.clone(), s.owners.clone()))
            .collect()
    }
}

/// Points an empty `slot` at `image`.
fn fill(slot: &mut Slot, image: &Path, swap: Swap) -> Result<(), SlotError> {
    swap(&slot.spec.id, image).map_err(|source| SlotError::Swap {
        drive: slot.spec.id.clone(),
        image: image.to_path_buf(),
        source: Box::new(source),
    })?;
    slot.image = Some(image.to_path_buf());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn slots(writable: u32, read_only: u32) -> Slots {
        let config = Config {
            drive_slots: writable,
            image_slots: read_only,
            ..Config::default()
        };
        Slots::new(&layout(&config, &PodDir("/pod".into())))
    }

    /// Records each swap as `drive=file name`; fails the ones `fail` names.
    struct Drives {
        swaps: RefCell<Vec<String>>,
        fail: RefCell<Option<String>>,
    }

    impl Drives {
        fn new() -> Drives {
            Drives {
                swaps: RefCell::new(Vec::new()),
                fail: RefCell::new(None),
            }
        }

        fn swap(&self, drive: &str, image: &Path) -> Result<(), VmError> {
            let name = image.file_name().unwrap().to_string_lossy().into_owned();
            if self.fail.borrow().as_deref() == Some(drive) {
                return Err(VmError::Api(crate::api_client::ApiError::Malformed(
                    "refused".into(),
                )));
            }
            self.swaps.borrow_mut().push(format!("{drive}={name}"));
            Ok(())
        }

        fn taken(&self) -> Vec<String> {
            std::mem::take(&mut *self.swaps.borrow_mut())
        }
    }

    #[test]
    fn the_layout_names_writable_slots_first() {
        let specs = layout(
            &Config {
                drive_slots: 2,
                image_slots: 1,
                ..Config::default()
            },
            &PodDir("/pod".into()),
        );
        let ids: Vec<(&str, bool)> = specs.iter().map(|s| (s.id.as_str(), s.read_only)).collect();
        assert_eq!(ids, [("slot0", false), ("slot1", false), ("image0", true)]);
        assert_eq!(specs[2].placeholder, Path::new("/pod/image0.empty"));
    }

    #[test]
    fn writable_slots_are_handed_out_until_none_is_left_and_come_back() {
        let d = Drives::new();
        let swap = |id: &str, p: &Path| d.swap(id, p);
        let mut s = slots(2, 0);
        assert_eq!(s.attach("a", Path::new("/a.ext4"), &swap).unwrap(), "slot0");
        assert_eq!(s.attach("b", Path::new("/b.ext4"), &swap).unwrap(), "slot1");
        let full = s.attach("c", Path::new("/c.ext4"), &swap).unwrap_err();
        assert!(matches!(full, SlotError::NoSlot(2)), "{full}");
        assert_eq!(d.taken(), ["slot0=a.ext4", "slot1=b.ext4"]);
        s.detach("a", &swap).unwrap();
        assert_eq!(d.taken(), ["slot0=slot0.empty"]);
        assert_eq!(s.attach("c", Path::new("/c.ext4"), &swap).unwrap(), "slot0");
        // Releasing an owner that holds nothing touches no drive.
        s.detach("nobody", &swap).unwrap();
        assert_eq!(d.taken(), ["slot0=c.ext4"]);
    }

    #[test]
    fn an_image_slot_is_shared_and_emptied_by_its_last_owner() {
        let d = Drives::new();
        let swap = |id: &str, p: &Path| d.swap(id, p);
        let mut s = slots(1, 2);
        let layers = Path::new("/cache/busybox.ext4");
        assert_eq!(s.attach_shared("a", layers, &swap).unwrap(), "image0");
        assert_eq!(s.attach_shared("b", layers, &swap).unwrap(), "image0");
        assert_eq!(
            s.attach_shared("c", Path::new("/cache/other.ext4"), &swap)
                .unwrap(),
            "image1"
        );
        let full = s
            .attach_shared("d", Path::new("/cache/third.ext4"), &swap)
            .unwrap_err();
        assert!(matches!(full, SlotError::NoImageSlot(2)), "{full}");
        assert_eq!(d.taken(), ["image0=busybox.ext4", "image1=other.ext4"]);
        s.detach("a", &swap).unwrap();
        assert!(d.taken().is_empty(), "b still uses image0");
        s.detach("b", &swap).unwrap();
        assert_eq!(d.taken(), ["image0=image0.empty"]);
        // The writable slot was never touched.
        assert_eq!(s.owners()[0], ("slot0".to_string(), vec![]));
    }

    #[test]
    fn a_failed_swap_leaves_an_attach_free_and_a_detach_owned() {
        let d = Drives::new();
        let swap = |id: &str, p: &Path| d.swap(id, p);
        let mut s = slots(1, 0);
        *d.fail.borrow_mut() = Some("slot0".into());
        let e = s.attach("a", Path::new("/a.ext4"), &swap).unwrap_err();
        assert!(matches!(e, SlotError::Swap { .. }), "{e}");
        assert_eq!(s.owners()[0].1, Vec::<String>::new());
        *d.fail.borrow_mut() = None;
        s.attach("a", Path::new("/a.ext4"), &swap).unwrap();
        *d.fail.borrow_mut() = Some("slot0".into());
        assert!(s.detach("a", &swap).is_err());
        // Still holding a's disk: not handed out again.
        assert!(matches!(
            s.attach("b", Path::new("/b.ext4"), &swap),
            Err(SlotError::NoSlot(1))
        ));
        *d.fail.borrow_mut() = None;
        s.detach("a", &swap).unwrap();
        assert_eq!(s.owners()[0].1, Vec::<String>::new());
    }
}

//! The snapshot requests' checks and their translation for the VMM:
//! `PUT /snapshot/create` (Full only, the VM paused) and
//! `PUT /snapshot/load` (a File memory backend, Firecracker's overrides
//! and husk's own for drives and virtio-fs backends; what husk does not do
//! is refused rather than ignored), and the
//! configuration a restored VM reports in `GET /vm/config`.

pub use husk_api_types::{
    DriveOverride, FsOverride, MemBackend, MemBackendType, NetworkOverride, SnapshotCreateParams,
    SnapshotLoadParams, SnapshotType, VsockOverride,
};

use super::resources::{
    check_id, parse_mac, Drive, FsConfig, MachineConfig, MemoryHotplugConfig, NetworkInterface,
    ResourceError, VmResources, Vsock,
};
use crate::config::{SerialOutput, VsockConfig};
use crate::persist::{self, LoadParams, NetOverride};
use crate::vmm::Vmm;

/// Checks a create request before the VM is touched or a file written.
/// (What only the VM knows, such as plugged memory or a used virtio-fs
/// device, the VMM refuses itself, also before writing anything.)
pub fn check_create(params: &SnapshotCreateParams) -> Result<(), ResourceError> {
    if params.snapshot_type == SnapshotType::Diff {
        return Err(ResourceError::Unsupported("a Diff snapshot"));
    }
    if params.snapshot_path.as_os_str().is_empty() || params.mem_file_path.as_os_str().is_empty() {
        return Err(ResourceError::SnapshotPaths);
    }
    if params.snapshot_path == params.mem_file_path {
        return Err(ResourceError::SnapshotPaths);
    }
    Ok(())
}

/// Checks a load request and turns it into what [`Vmm::restore`] takes.
pub fn load_params(
    params: &SnapshotLoadParams,
    serial: SerialOutput,
) -> Result<LoadParams, ResourceError> {
    let mem_file_path = match (&params.mem_backend, &params.mem_file_path) {
        (
            Some(MemBackend {
                backend_type: MemBackendType::File,
                backend_path,
            }),
            None,
        ) => backend_path.clone(),
        (
            Some(MemBackend {
                backend_type: MemBackendType::Uffd,
                ..
            }),
            None,
        ) => return Err(ResourceError::Unsupported("a Uffd memory backend")),
        (None, Some(path)) => path.clone(),
        _ => return Err(ResourceError::MemBackend),
    };
    if params.track_dirty_pages == Some(true) || params.enable_diff_snapshots == Some(true) {
        return Err(ResourceError::Unsupported("dirty page tracking"));
    }
    if params.clock_realtime == Some(true) {
        return Err(ResourceError::Unsupported("clock_realtime"));
    }
    if !matches!(
        params.huge_pages.as_deref(),
        None | Some("None" | "Snapshot")
    ) {
        return Err(ResourceError::Unsupported("huge pages"));
    }
    let mut net_overrides = Vec::with_capacity(params.network_overrides.len());
    for o in &params.network_overrides {
        check_id("network interface", &o.iface_id)?;
        let name = &o.host_dev_name;
        if name.is_empty()
            || name.len() > 15
            || name.contains('/')
            || name.chars().any(char::is_whitespace)
        {
            return Err(ResourceError::TapName(name.clone()));
        }
        if net_overrides
            .iter()
            .any(|n: &NetOverride| n.iface_id == o.iface_id)
        {
            return Err(ResourceError::DuplicateOverride {
                kind: "network interface",
                id: o.iface_id.clone(),
            });
        }
        net_overrides.push(NetOverride {
            iface_id: o.iface_id.clone(),
            host_dev_name: name.clone(),
            guest_mac: o.guest_mac.as_deref().map(parse_mac).transpose()?,
        });
    }
    let vsock_uds_path = match &params.vsock_override {
        Some(o) => {
            // The CID is the snapshot's; only the path is checked here.
            let probe = VsockConfig {
                guest_cid: 3,
                uds_path: o.uds_path.clone(),
            };
            crate::config::check_vsock(&probe)
                .map_err(|_| ResourceError::UdsPath(o.uds_path.clone()))?;
            Some(o.uds_path.clone())
        }
        None => None,
    };
    Ok(LoadParams {
        snapshot_path: params.snapshot_path.clone(),
        mem_file_path,
        net_overrides,
        vsock_uds_path,
        drive_overrides: drive_overrides(&params.drive_overrides)?,
        fs_overrides: fs_overrides(&params.fs_overrides)?,
        serial,
        // The controller's own, set by its caller.
        seccomp: crate::seccomp::SeccompFilters::builtin(),
    })
}

/// Checks `drive_overrides`: valid ids, each once, a path. Whether the
/// snapshot has such drives is the restore's check (before anything runs).
fn drive_overrides(given: &[DriveOverride]) -> Result<Vec<persist::DriveOverride>, ResourceError> {
    let mut out: Vec<persist::DriveOverride> = Vec::with_capacity(given.len());
    for o in given {
        check_id("drive", &o.drive_id)?;
        if out.iter().any(|d| d.drive_id == o.drive_id) {
            return Err(ResourceError::DuplicateOverride {
                kind: "drive",
                id: o.drive_id.clone(),
            });
        }
        if o.path_on_host.as_os_str().is_empty() {
            return Err(ResourceError::OverridePath {
                kind: "drive",
                id: o.drive_id.clone(),
                path: o.path_on_host.clone(),
            });
        }
        out.push(persist::DriveOverride {
            drive_id: o.drive_id.clone(),
            path_on_host: o.path_on_host.clone(),
        });
    }
    Ok(out)
}

/// Checks `fs_overrides`: valid ids, each once, a socket path that fits a
/// unix socket address.
fn fs_overrides(given: &[FsOverride]) -> Result<Vec<persist::FsOverride>, ResourceError> {
    let mut out: Vec<persist::FsOverride> = Vec::with_capacity(given.len());
    for o in given {
        check_id("file system", &o.id)?;
        if out.iter().any(|f| f.id == o.id) {
            return Err(ResourceError::DuplicateOverride {
                kind: "file system",
                id: o.id.clone(),
            });
        }
        let len = o.socket.as_os_str().len();
        if len == 0 || len > 107 {
            return Err(ResourceError::OverridePath {
                kind: "file system",
                id: o.id.clone(),
                path: o.socket.clone(),
            });
        }
        out.push(persist::FsOverride {
            id: o.id.clone(),
            socket: o.socket.clone(),
        });
    }
    Ok(out)
}

/// What a restored VM reports as its configuration: its machine and
/// devices as they are now (overrides applied), no boot source.
pub fn restored_resources(vmm: &Vmm, kept: &VmResources) -> VmResources {
    let d = vmm.describe();
    VmResources {
        boot_source: None,
        fs: d
            .fs
            .iter()
            .map(|f| FsConfig {
                id: f.id.clone(),
                tag: f.tag.clone(),
                socket: f.socket.clone(),
                num_queues: u64::from(f.num_queues),
                queue_size: u64::from(f.queue_size),
                relay: f.relay,
            })
            .collect(),
        machine_config: MachineConfig {
            vcpu_count: d.vcpu_count,
            mem_size_mib: d.mem_size_mib,
            max_vcpu_count: (d.max_vcpu_count > d.vcpu_count).then_some(d.max_vcpu_count),
            ..Default::default()
        },
        drives: d
            .drives
            .iter()
            .map(|drive| {
                let mut api = Drive::new(
                    drive.block.id.clone(),
                    drive.block.path.clone(),
                    drive.block.read_only,
                );
                api.is_root_device = drive.is_root;
                api
            })
            .collect(),
        network_interfaces: d
            .net
            .iter()
            .map(|n| NetworkInterface {
                iface_id: n.id.clone(),
                host_dev_name: n.host_dev_name.clone(),
                guest_mac: n.guest_mac.map(|m| m.to_string()),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect(),
        vsock: d.vsock.map(|v| Vsock {
            guest_cid: u64::from(v.guest_cid),
            uds_path: v.uds_path,
            vsock_id: None,
        }),
        logger: kept.logger.clone(),
        metrics: kept.metrics.clone(),
        memory_hotplug: d.mem_hotplug.map(|r| MemoryHotplugConfig {
            total_size_mib: r.size >> 20,
            block_size_mib: r.block_size >> 20,
            slot_size_mib: r.slot_size >> 20,
        }),
        snapshot_load: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_takes_full_snapshots_to_two_files() {
        let mut p = SnapshotCreateParams {
            snapshot_type: SnapshotType::Full,
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
        };
        assert!(check_create(&p).is_ok());
        p.snapshot_type = SnapshotType::Diff;
        assert!(matches!(
            check_create(&p),
            Err(ResourceError::Unsupported("a Diff snapshot"))
        ));
        p.snapshot_type = SnapshotType::Full;
        p.mem_file_path = "/s".into();
        assert!(matches!(
            check_create(&p),
            Err(ResourceError::SnapshotPaths)
        ));
    }

    #[test]
    fn drive_and_fs_overrides_are_checked_and_passed_on() {
        let mut p = SnapshotLoadParams::new("/s", "/m");
        p.drive_overrides.push(DriveOverride {
            drive_id: "rootfs".into(),
            path_on_host: "/pods/a/root.img".into(),
        });
        p.fs_overrides.push(FsOverride {
            id: "share".into(),
            socket: "/pods/a/fs.sock".into(),
        });
        let l = load_params(&p, SerialOutput::Sink).unwrap();
        assert_eq!(
            l.drive_overrides,
            [persist::DriveOverride {
                drive_id: "rootfs".into(),
                path_on_host: "/pods/a/root.img".into()
            }]
        );
        assert_eq!(
            l.fs_overrides,
            [persist::FsOverride {
                id: "share".into(),
                socket: "/pods/a/fs.sock".into()
            }]
        );

        let mut twice = p.clone();
        twice.drive_overrides.push(twice.drive_overrides[0].clone());
        let err = load_params(&twice, SerialOutput::Sink).unwrap_err();
        assert!(
            matches!(&err, ResourceError::DuplicateOverride { kind: "drive", id } if id == "rootfs"),
            "{err:?}"
        );
        let mut twice = p.clone();
        twice.fs_overrides.push(twice.fs_overrides[0].clone());
        assert!(matches!(
            load_params(&twice, SerialOutput::Sink),
            Err(ResourceError::DuplicateOverride {
                kind: "file system",
                ..
            })
        ));
        let mut bad_id = p.clone();
        bad_id.fs_overrides[0].id = "a/b".into();
        assert!(matches!(
            load_params(&bad_id, SerialOutput::Sink),
            Err(ResourceError::InvalidId { .. })
        ));
        let mut no_path = p.clone();
        no_path.drive_overrides[0].path_on_host = "".into();
        assert!(matches!(
            load_params(&no_path, SerialOutput::Sink),
            Err(ResourceError::OverridePath { kind: "drive", .. })
        ));
        let mut long_sock = p;
        long_sock.fs_overrides[0].socket = "/x".repeat(60).into();
        let err = load_params(&long_sock, SerialOutput::Sink).unwrap_err();
        assert!(
            matches!(
                err,
                ResourceError::OverridePath {
                    kind: "file system",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn load_wants_one_file_backend_and_refuses_what_husk_lacks() {
        let ok = SnapshotLoadParams::new("/s", "/m");
        let l = load_params(&ok, SerialOutput::Sink).unwrap();
        assert_eq!(l.mem_file_path, std::path::PathBuf::from("/m"));

        let mut both = ok.clone();
        both.mem_file_path = Some("/m2".into());
        assert!(matches!(
            load_params(&both, SerialOutput::Sink),
            Err(ResourceError::MemBackend)
        ));
        let mut neither = ok.clone();
        neither.mem_backend = None;
        assert!(matches!(
            load_params(&neither, SerialOutput::Sink),
            Err(ResourceError::MemBackend)
        ));
        let mut old_style = neither.clone();
        old_style.mem_file_path = Some("/m3".into());
        assert_eq!(
            load_params(&old_style, SerialOutput::Sink)
                .unwrap()
                .mem_file_path,
            std::path::PathBuf::from("/m3")
        );
        let mut uffd = ok.clone();
        uffd.mem_backend = Some(MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: "/u".into(),
        });
        assert!(matches!(
            load_params(&uffd, SerialOutput::Sink),
            Err(ResourceError::Unsupported(_))
        ));
        let mut dirty = ok.clone();
        dirty.track_dirty_pages = Some(true);
        assert!(load_params(&dirty, SerialOutput::Sink).is_err());
        let mut bad_tap = ok.clone();
        bad_tap.network_overrides.push(NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "a/b".into(),
            guest_mac: None,
        });
        assert!(matches!(
            load_params(&bad_tap, SerialOutput::Sink),
            Err(ResourceError::TapName(_))
        ));
        let mut twice = ok.clone();
        for _ in 0..2 {
            twice.network_overrides.push(NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap1".into(),
                guest_mac: Some("06:00:00:00:00:01".into()),
            });
        }
        assert!(matches!(
            load_params(&twice, SerialOutput::Sink),
            Err(ResourceError::DuplicateOverride { id, .. }) if id == "eth0"
        ));
        let mut long_sock = ok;
        long_sock.vsock_override = Some(VsockOverride {
            uds_path: "/x".repeat(60).into(),
        });
        assert!(matches!(
            load_params(&long_sock, SerialOutput::Sink),
            Err(ResourceError::UdsPath(_))
        ));
    }
}

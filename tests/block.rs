//! virtio-blk against the guest kernel's own virtio_blk driver: ext4 on a
//! second disk and as the root device, read-only drives, drive ids. Disk
//! images are made and checked inside the node VM with Debian's e2fsprogs,
//! so what the guest wrote is read back by a program that is not husk.

use husk_tests::{artifacts, host_tool, initrd_with_script, Payload};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

fn with_e2fsprogs(p: Payload) -> Payload {
    p.add(&host_tool("mke2fs"), "mke2fs")
        .add(&host_tool("debugfs"), "debugfs")
        .add(&host_tool("e2fsck"), "e2fsck")
}

#[test]
fn ext4_second_disk_holds_what_the_guest_wrote() {
    // 64 MiB written through ext4 and virtio-blk, checksummed in the guest,
    // then read back from the image on the host side with debugfs.
    let initrd = initrd_with_script(
        "ext4-data",
        "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt || exit 1
         yes 'husk virtio-blk test data' | head -c 67108864 > /mnt/data || exit 2
         echo \"GUEST-SHA $(sha256sum /mnt/data | cut -d' ' -f1)\"
         umount /mnt || exit 3",
    );
    let r = with_e2fsprogs(Payload::new("ext4-data"))
        .add(&artifacts().husk, "husk")
        .add(&artifacts().vmlinux, "vmlinux")
        .add(&initrd, "initrd.cpio")
        .run(&format!(
            "./mke2fs -q -F -t ext4 data.img 128M || exit 10
             timeout 600 ./husk boot --log-level info --kernel vmlinux --initrd initrd.cpio \
               --mem-mib 256 --cmdline '{CMDLINE}' --drive id=data,path=data.img || exit 11
             ./e2fsck -fn data.img > fsck.txt 2>&1 || {{ cat fsck.txt; exit 12; }}
             echo \"NODE-SHA $(./debugfs -R 'cat /data' data.img 2>/dev/null | sha256sum | cut -d' ' -f1)\"
             echo \"NODE-SIZE $(./debugfs -R 'stat /data' data.img 2>/dev/null | grep -o 'Size: [0-9]*')\""
        ));
    r.assert_status(0)
        .assert_contains("HUSK-GUEST-TEST-STATUS 0");
    let guest = r.value("GUEST-SHA").expect("guest checksum");
    let node = r.value("NODE-SHA").expect("node checksum");
    assert_eq!(guest.len(), 64, "{}", r.output);
    assert_eq!(guest, node, "{}", r.output);
    assert_eq!(r.value("NODE-SIZE").as_deref(), Some("Size: 67108864"));
}

#[test]
fn ext4_root_device_boots_to_user_space() {
    // The test initramfs unpacked into an ext4 image, booted with no initrd.
    let a = artifacts();
    let r = with_e2fsprogs(Payload::new("ext4-root"))
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(&a.test_initrd, "initrd.cpio")
        .run(&format!(
            "mkdir rootfs && (cd rootfs && cpio -id < ../initrd.cpio 2>/dev/null) || exit 10
             ./mke2fs -q -F -t ext4 -d rootfs root.img 64M || exit 11
             timeout 300 ./husk boot --kernel vmlinux --cmdline '{CMDLINE} init=/init' \
               --drive id=rootfs,path=root.img,root"
        ));
    r.assert_status(0).assert_contains("HUSK-GUEST-READY");
    let cmdline = r.value("HUSK-GUEST-CMDLINE").unwrap_or_default();
    assert!(cmdline.contains("root=/dev/vda rw"), "{cmdline}");
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{cmdline}"
    );
}

#[test]
fn read_only_drive_and_drive_ids() {
    let initrd = initrd_with_script(
        "ro",
        "echo \"VDA $(cat /sys/block/vda/serial) ro=$(cat /sys/block/vda/ro) sectors=$(cat /sys/block/vda/size)\"
         echo \"VDB $(cat /sys/block/vdb/serial) ro=$(cat /sys/block/vdb/ro)\"
         if echo overwrite | dd of=/dev/vdb conv=fsync 2>/dev/null; then echo RO-WRITE accepted; else echo RO-WRITE refused; fi
         echo \"VDB-READ $(head -c 16 /dev/vdb)\"
         echo \"VDC $(cat /sys/block/vdc/serial) sectors=$(cat /sys/block/vdc/size)\"
         echo on-a-block-device | dd of=/dev/vdc bs=512 seek=1 conv=sync,fsync 2>/dev/null
         echo written | dd of=/dev/vda conv=sync,fsync 2>/dev/null",
    );
    let r = Payload::new("ro")
        .add(&artifacts().husk, "husk")
        .add(&artifacts().vmlinux, "vmlinux")
        .add(&initrd, "initrd.cpio")
        .run(&format!(
            "truncate -s 8M rw.img
             printf 'read-only-content' > ro.img && truncate -s 1M ro.img
             before=$(sha256sum ro.img)
             # A block device as a backing (as LVM or devmapper would give):
             # its size comes from seeking to its end, not from stat.
             truncate -s 3M loop.img && loop=$(losetup -f) && losetup $loop loop.img || exit 12
             timeout 300 ./husk boot --kernel vmlinux --initrd initrd.cpio --cmdline '{CMDLINE}' \
               --drive id=scratch-1,path=rw.img --drive id=golden,path=ro.img,ro \
               --drive id=loop,path=$loop || exit 11
             losetup -d $loop
             [ \"$before\" = \"$(sha256sum ro.img)\" ] && echo RO-IMAGE unchanged
             echo \"RW-IMAGE $(head -c 7 rw.img)\"
             echo \"LOOP-IMAGE $(dd if=loop.img bs=512 skip=1 count=1 2>/dev/null | head -c 17)\""
        ));
    r.assert_status(0);
    assert_eq!(
        r.value("VDA").as_deref(),
        Some("scratch-1 ro=0 sectors=16384"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("VDB").as_deref(),
        Some("golden ro=1"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("RO-WRITE").as_deref(),
        Some("refused"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("VDB-READ").as_deref(),
        Some("read-only-conten"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("RO-IMAGE").as_deref(),
        Some("unchanged"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("RW-IMAGE").as_deref(),
        Some("written"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("VDC").as_deref(),
        Some("loop sectors=6144"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("LOOP-IMAGE").as_deref(),
        Some("on-a-block-device"),
        "{}",
        r.output
    );
}

#[test]
fn missing_drive_file_is_refused() {
    let r = husk_tests::husk_on_host(&[
        "boot",
        "--kernel",
        artifacts().vmlinux.to_str().unwrap(),
        "--drive",
        "id=data,path=/nonexistent/disk.img",
    ]);
    r.assert_status(1)
        .assert_contains("cannot open drive data backing file /nonexistent/disk.img");
}

/// husk boot on this host under `timeout`: a husk that hangs ends with
/// status 124 instead of hanging the test.
fn husk_within_30s(args: &[&str]) -> husk_tests::RunResult {
    let out = std::process::Command::new("timeout")
        .arg("30")
        .arg(husk_tests::husk_binary())
        .args(args)
        .output()
        .expect("run timeout husk");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    husk_tests::RunResult {
        status: out.status.code().unwrap_or(-1),
        output,
    }
}

#[test]
fn a_fifo_or_a_device_as_drive_kernel_or_console_is_refused_without_hanging() {
    let dir = std::env::temp_dir().join(format!("husk-block-fifo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    let k = artifacts().vmlinux.to_str().unwrap();
    // Read-only: opened for reading alone, a FIFO waits for a writer.
    for (spec, found) in [(fifo, "a FIFO"), ("/dev/null", "a character device")] {
        husk_within_30s(&["boot", "--kernel", k, "--drive", &format!("id=data,path={spec},ro")])
            .assert_status(1)
            .assert_contains(&format!(
                "cannot open drive data backing file {spec}: it is {found}, not a regular file or a block device"
            ));
    }
    husk_within_30s(&["boot", "--kernel", fifo])
        .assert_status(1)
        .assert_contains(&format!(
            "cannot read kernel {fifo}: it is a FIFO, not a regular file"
        ));
    // A console FIFO nobody reads: refused at once (ENXIO), not waited on.
    husk_within_30s(&["boot", "--kernel", k, "--serial", &format!("file:{fifo}")])
        .assert_status(1)
        .assert_contains(&format!("cannot open serial output {fifo}"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_drive_specs_are_refused() {
    let k = artifacts().vmlinux.to_str().unwrap();
    let dup = husk_tests::husk_on_host(&[
        "boot",
        "--kernel",
        k,
        "--drive",
        "id=a,path=/dev/null",
        "--drive",
        "id=a,path=/dev/null",
    ]);
    dup.assert_status(1)
        .assert_contains("drive id \"a\" is used twice");
    let usage = husk_tests::husk_on_host(&["boot", "--kernel", k, "--drive", "path=/dev/null"]);
    usage
        .assert_status(2)
        .assert_contains("a drive needs id=ID and path=FILE");
}

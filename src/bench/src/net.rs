//! `husk-bench net`: TCP throughput through virtio-net and a tap, measured
//! in the node on the tap's side; and `husk-bench tap`, which creates the
//! tap where no `ip tuntap` exists (busybox's ip has none).
//!
//! The node listens on 172.16.0.1 (the tap), the guest (172.16.0.2) first
//! sends N bytes to port 5000, then reads N bytes from port 5001. Each
//! direction is timed from accept to the peer's end of stream.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

const NODE_ADDR: &str = "172.16.0.1";
const TAP: &str = "huskbench0";

/// Flags of `husk-bench net`.
#[derive(clap::Args)]
pub struct NetBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs whose /husk-test.sh configures eth0 as 172.16.0.2/24,
    /// sends husk.net_bytes bytes to 172.16.0.1:5000 and reads from :5001
    /// (resources/bench.sh makes it).
    #[arg(long)]
    initrd: PathBuf,
    /// MiB per direction.
    #[arg(long, default_value_t = 100)]
    size_mib: u64,
}

/// Flags of `husk-bench tap`.
#[derive(clap::Args)]
pub struct TapArgs {
    /// Interface name.
    name: String,
}

/// Creates a persistent tap (it stays after this process ends).
pub fn tap(a: TapArgs) -> anyhow::Result<()> {
    vmm::devices::virtio::net::tap::Tap::create_persistent(&a.name)
        .with_context(|| format!("cannot create tap {}", a.name))?;
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("cannot run ip")?;
    if !status.success() {
        bail!("ip {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn accept(listener: &TcpListener, husk: &mut Child) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(status) = husk.try_wait()? {
            bail!("husk exited ({status}) before the guest connected");
        }
        if Instant::now() > deadline {
            bail!("the guest did not connect within 600 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    let v = bytes as f64 / (1 << 20) as f64 / d.as_secs_f64();
    (v * 10.0).round() / 10.0
}

/// Runs the benchmark; the tap exists only while it runs.
pub fn net(b: NetBench) -> anyhow::Result<serde_json::Value> {
    let bytes = b.size_mib << 20;
    vmm::devices::virtio::net::tap::Tap::create_persistent(TAP)
        .with_context(|| format!("cannot create tap {TAP}"))?;
    let result = run(&b, bytes);
    let _ = ip(&["link", "del", TAP]);
    let (up, down) = result?;
    Ok(json!({
        "benchmark": "virtio-net",
        "size_mib": b.size_mib,
        "guest": { "vcpus": 1, "mem_mib": 256 },
        "guest_to_node": { "seconds": up.as_secs_f64(), "mib_s": mib_s(bytes, up) },
        "node_to_guest": { "seconds": down.as_secs_f64(), "mib_s": mib_s(bytes, down) },
    }))
}

fn run(b: &NetBench, bytes: u64) -> anyhow::Result<(Duration, Duration)> {
    ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", TAP])?;
    ip(&["link", "set", TAP, "up"])?;
    let up_listener = TcpListener::bind((NODE_ADDR, 5000))?;
    let down_listener = TcpListener::bind((NODE_ADDR, 5001))?;
    let mut husk = Command::new(&b.husk)
        .args(["boot", "--mem-mib", "256", "--serial", "none", "--kernel"])
        .arg(&b.kernel)
        .arg("--initrd")
        .arg(&b.initrd)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 pci=off quiet husk.net_bytes={bytes}"
        ))
        .args(["--net", &format!("id=eth0,tap={TAP}")])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", b.husk.display()))?;

    let mut s = accept(&up_listener, &mut husk)?;
    let t0 = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let up = t0.elapsed();
    drop(s);
    if got != bytes {
        bail!("guest to node: {got} bytes arrived, {bytes} were sent");
    }

    let mut s = accept(&down_listener, &mut husk)?;
    let t0 = Instant::now();
    buf.fill(0);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    // The guest closes once it has read everything.
    while s.read(&mut buf)? > 0 {}
    let down = t0.elapsed();

    let status = husk.wait()?;
    if !status.success() {
        bail!("husk exited with {status}");
    }
    Ok((up, down))
}

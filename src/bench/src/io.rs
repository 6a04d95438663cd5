//! `husk-bench io`: a small I/O load generator that runs the same way in a
//! guest (against /dev/vdX) and on the host (against the backing file), so
//! virtio-blk can be compared with the storage underneath it. Sequential
//! reads and writes in 1 MiB blocks, random reads and writes in 4 KiB blocks
//! at random aligned offsets, `depth` requests in flight (one thread each),
//! O_DIRECT where the target supports it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

const SEQ_BLOCK: usize = 1 << 20;
const RAND_BLOCK: usize = 4096;
const ALIGN: usize = 4096;

/// Opens `path` for direct I/O, falling back to buffered I/O where the
/// filesystem refuses O_DIRECT (tmpfs).
fn open(path: &Path) -> anyhow::Result<(File, bool)> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = OpenOptions::new().read(true).write(true).open(path)?;
            Ok((f, false))
        }
        Err(e) => Err(e).with_context(|| format!("cannot open {}", path.display())),
    }
}

/// A zeroed buffer of `len` bytes whose start is 4 KiB aligned (O_DIRECT).
struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0xa5u8; len + ALIGN];
        let offset = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// xorshift64: good enough to scatter offsets, and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy)]
enum Pattern {
    SeqRead,
    SeqWrite,
    RandRead,
    RandWrite,
}

/// Runs one pattern for `runtime` with `depth` requests in flight (one
/// thread each, as fio's psync engine with numjobs does: no io_uring or
/// libaio needed in a minimal guest); returns (operations, bytes, elapsed).
fn run(
    file: &File,
    size: u64,
    pattern: Pattern,
    runtime: Duration,
    depth: usize,
) -> anyhow::Result<(u64, u64, Duration)> {
    let block = match pattern {
        Pattern::SeqRead | Pattern::SeqWrite => SEQ_BLOCK,
        Pattern::RandRead | Pattern::RandWrite => RAND_BLOCK,
    };
    let blocks = size / block as u64;
    if blocks == 0 {
        bail!("the target is smaller than one {block}-byte block");
    }
    // Sequential workers share the position, so together they still walk
    // the file in order.
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let worker = |seed: u64| -> std::io::Result<u64> {
        let mut buf = AlignedBuf::new(block);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut ops = 0u64;
        // At least one operation per worker, however late it was
        // scheduled: a pattern measured over no operation says nothing.
        while ops == 0 || start.elapsed() < runtime {
            let index = match pattern {
                Pattern::SeqRead | Pattern::SeqWrite => {
                    next.fetch_add(1, Ordering::Relaxed) % blocks
                }
                Pattern::RandRead | Pattern::RandWrite => rng.next() % blocks,
            };
            let offset = index * block as u64;
            match pattern {
                Pattern::SeqRead | Pattern::RandRead => file.read_exact_at(buf.get(), offset)?,
                Pattern::SeqWrite | Pattern::RandWrite => file.write_all_at(buf.get(), offset)?,
            }
            ops += 1;
        }
        Ok(ops)
    };
    let ops = std::thread::scope(|s| {
        let workers: Vec<_> = (0..depth.max(1) as u64)
            .map(|seed| s.spawn(move || worker(seed)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .sum::<std::io::Result<u64>>()
    })?;
    if matches!(pattern, Pattern::SeqWrite | Pattern::RandWrite) {
        file.sync_data()?;
    }
    Ok((ops, ops * block as u64, start.elapsed()))
}

/// The load `husk-bench blk` and `husk-bench fs` put on each device.
#[derive(clap::Args)]
pub struct Load {
    /// Size of each backing file in MiB (the guest uses it all).
    #[arg(long, default_value_t = 128)]
    pub size_mib: u64,
    /// Seconds per pattern.
    #[arg(long, default_value_t = 5)]
    pub runtime_s: u64,
    /// Queue depths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16])]
    pub depths: Vec<usize>,
}

impl Load {
    /// Refuses an empty depth list or a depth of 0.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.depths.is_empty() || self.depths.contains(&0) {
            bail!("--depths needs one or more depths of at least 1");
        }
        Ok(())
    }

    /// The depths as the guest's `husk.io_depths=` wants them.
    pub fn depth_list(&self) -> String {
        self.depths
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The JSON results the guest printed after `prefix`, one per line.
pub fn guest_results(console: &str, prefix: &str) -> anyhow::Result<Vec<Value>> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .map(|j| serde_json::from_str::<Value>(j).context("the guest's JSON"))
        .collect()
}

/// Each pattern's MiB/s in `a` over that in `b` (patterns `b` lacks or
/// measured at 0 left out), to three decimals.
pub fn mib_s_ratio(a: &Value, b: &Value) -> serde_json::Map<String, Value> {
    let mut ratio = serde_json::Map::new();
    for (k, v) in a.as_object().into_iter().flatten() {
        if let (Some(x), Some(y)) = (v["mib_s"].as_f64(), b[k]["mib_s"].as_f64()) {
            if y > 0.0 {
                ratio.insert(k.clone(), json!((x / y * 1000.0).round() / 1000.0));
            }
        }
    }
    ratio
}

/// Runs all four patterns against `path` (its first `size_mib` MiB) with
/// `depth` requests in flight.
pub fn io(path: &Path, size_mib: u64, runtime: Duration, depth: usize) -> anyhow::Result<Value> {
    let (file, direct) = open(path)?;
    let size = size_mib << 20;
    let mut out = serde_json::Map::new();
    for (name, pattern) in [
        ("seq_write", Pattern::SeqWrite),
        ("seq_read", Pattern::SeqRead),
        ("rand_write_4k", Pattern::RandWrite),
        ("rand_read_4k", Pattern::RandRead),
    ] {
        let (ops, bytes, elapsed) = run(&file, size, pattern, runtime, depth)
            .with_context(|| format!("{name} on {}", path.display()))?;
        let secs = elapsed.as_secs_f64();
        let r = |x: f64| (x * 10.0).round() / 10.0;
        out.insert(
            name.into(),
            json!({ "mib_s": r(bytes as f64 / secs / f64::from(1 << 20)), "iops": r(ops as f64 / secs) }),
        );
    }
    out.insert("o_direct".into(), json!(direct));
    out.insert("depth".into(), json!(depth.max(1)));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_small_file() {
        let path = std::env::temp_dir().join(format!("husk-io-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 2 << 20]).unwrap();
        for depth in [1, 4] {
            let v = io(&path, 2, Duration::from_millis(20), depth).unwrap();
            for k in ["seq_write", "seq_read", "rand_write_4k", "rand_read_4k"] {
                assert!(v[k]["iops"].as_f64().unwrap() > 0.0, "{k}: {v}");
            }
            assert_eq!(v["depth"], depth);
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn aligned_buffers_are_aligned() {
        let mut b = AlignedBuf::new(4096);
        assert_eq!(b.get().as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.get().len(), 4096);
    }
}

//! Summary statistics for benchmark samples.

use serde_json::{json, Value};

/// Median, mean, min, max and sample standard deviation, rounded to 0.001.
pub fn summary(samples: &[f64]) -> Value {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let mean = v.iter().sum::<f64>() / n as f64;
    let stdev = if n > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    json!({
        "median": r(median),
        "mean": r(mean),
        "min": r(v[0]),
        "max": r(v[n - 1]),
        "stdev": r(stdev),
    })
}

/// The CPU time (user and system, seconds) in a `/proc/.../stat` text:
/// a whole process's in `/proc/PID/stat`, one thread's in
/// `/proc/PID/task/TID/stat`.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // After the command's closing parenthesis: state is field 3, utime 14
    // and stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf(3) takes a constant and touches no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// A process's CPU time so far (user and system, all its threads), in
/// seconds; 0 once it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| stat_cpu_seconds(&s))
        .unwrap_or(0.0)
}

/// Each thread's CPU time so far (seconds), by thread name (threads of
/// one name added up); empty once the process is gone.
pub fn thread_cpu_seconds(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        *by_name.entry(comm.trim().to_string()).or_insert(0.0) += stat_cpu_seconds(&stat);
    }
    by_name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_parentheses_and_spaces() {
        // SAFETY: sysconf(3) takes a constant and touches no memory.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 3 0";
        assert_eq!(stat_cpu_seconds(stat), 400.0 / hz);
        assert_eq!(stat_cpu_seconds("garbage"), 0.0);
        assert_eq!(stat_cpu_seconds("1 (x) S 1"), 0.0);
    }

    #[test]
    fn this_process_and_its_threads_have_used_cpu() {
        // Spin until a clock tick has been charged (or 5 s, on a very
        // busy machine), then read it back both ways.
        let me = std::process::id();
        let spin = std::time::Instant::now();
        let threads = || thread_cpu_seconds(me).values().sum::<f64>();
        while threads() == 0.0 && spin.elapsed() < std::time::Duration::from_secs(5) {
            std::hint::black_box(0u64);
        }
        assert!(cpu_seconds(me) > 0.0);
        assert!(threads() > 0.0);
        assert!(thread_cpu_seconds(u32::MAX).is_empty());
    }

    #[test]
    fn odd_even_and_empty() {
        let s = summary(&[3.0, 1.0, 2.0]);
        assert_eq!(s["median"], 2.0);
        assert_eq!(s["min"], 1.0);
        assert_eq!(s["max"], 3.0);
        assert_eq!(s["stdev"], 1.0);
        assert_eq!(summary(&[1.0, 2.0, 3.0, 4.0])["median"], 2.5);
        assert_eq!(summary(&[]), Value::Null);
        assert_eq!(summary(&[5.0])["stdev"], 0.0);
    }
}

//! Where a benchmark phase's CPU went, read from `/proc` (Linux): CPU seconds per command
//! name (postgres, nisshi, the benchmark itself, a build running beside it) and the
//! machine's idle time, between two snapshots. On a machine whose cores are shared by the
//! broker, Postgres and the service, this tells a phase that waits from one that is short
//! of CPU, and which process the CPU went to.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of `/proc`'s CPU times (`getconf CLK_TCK`; 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU times at one moment.
pub struct Snapshot {
    at: Instant,
    /// pid → (command, ticks of user and system time).
    processes: BTreeMap<u32, (String, u64)>,
    /// The machine's idle ticks (idle and iowait) and stolen ticks (taken by the
    /// hypervisor for other guests), over all cores.
    idle: u64,
    steal: u64,
    cores: usize,
}

/// One process's command name and CPU ticks, from the text of `/proc/<pid>/stat`.
fn parse_stat(stat: &str) -> Option<(String, u64)> {
    // "pid (comm) state ppid ...": the name may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of the line, utime 14 and stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The machine's idle and stolen ticks and number of cores, from the text of `/proc/stat`.
fn parse_machine(stat: &str) -> Option<(u64, u64, usize)> {
    let total = stat.lines().next()?;
    let fields: Vec<u64> = total
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = fields.get(3)? + fields.get(4)?;
    let steal = fields.get(7).copied().unwrap_or(0);
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((idle, steal, cores.max(1)))
}

impl Snapshot {
    pub fn take() -> Snapshot {
        let mut processes = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                    continue;
                };
                // A process may exit between the listing and the read: skipped.
                if let Some((comm, ticks)) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .as_deref()
                    .and_then(parse_stat)
                {
                    processes.insert(pid, (comm, ticks));
                }
            }
        }
        let (idle, steal, cores) = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(parse_machine)
            .unwrap_or((0, 0, 1));
        Snapshot {
            at: Instant::now(),
            processes,
            idle,
            steal,
            cores,
        }
    }

    /// CPU seconds per command since `earlier` (processes that started in between count from
    /// zero; those that ended are missed), and one line that says it, largest first. Kernel
    /// workers rename themselves after the work they do (`kworker/0:1-events`): they count
    /// as one `kworker`.
    pub fn since(&self, earlier: &Snapshot) -> Usage {
        let mut by_command: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (comm, ticks)) in &self.processes {
            let before = earlier.processes.get(pid).map_or(0, |(_, t)| *t);
            let used = ticks.saturating_sub(before) as f64 / TICKS;
            if used > 0.0 {
                let name = if comm.starts_with("kworker/") {
                    "kworker"
                } else {
                    comm.as_str()
                };
                *by_command.entry(name.to_owned()).or_default() += used;
            }
        }
        Usage {
            wall: self.at.duration_since(earlier.at).as_secs_f64(),
            cores: self.cores,
            idle: self.idle.saturating_sub(earlier.idle) as f64 / TICKS,
            steal: self.steal.saturating_sub(earlier.steal) as f64 / TICKS,
            by_command,
        }
    }
}

/// CPU used between two snapshots.
pub struct Usage {
    pub wall: f64,
    pub cores: usize,
    /// Idle core-seconds of the whole machine.
    pub idle: f64,
    /// Core-seconds the hypervisor gave to other guests.
    pub steal: f64,
    pub by_command: BTreeMap<String, f64>,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} s wall × {} cores = {:.1} core-s, idle {:.1}, stolen {:.1}",
            self.wall,
            self.cores,
            self.wall * self.cores as f64,
            self.idle,
            self.steal
        )?;
        let mut used: Vec<(&String, &f64)> = self.by_command.iter().collect();
        used.sort_by(|a, b| b.1.total_cmp(a.1));
        for (comm, s) in used.iter().filter(|(_, s)| **s >= 0.05) {
            write!(f, "; {comm} {s:.1}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_process_line_whose_name_has_spaces_and_parentheses() {
        let line =
            "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 12 0 0 0 731 96 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat(line), Some(("tokio (rt) 1".to_owned(), 827)));
    }

    #[test]
    fn reads_the_machine_idle_and_cores() {
        let stat = "cpu  100 0 50 9000 30 0 0 5 0 0\ncpu0 50 0 25 4500 15 0 2 0 0 0\ncpu1 50 0 25 4500 15 0 3 0 0 0\nintr 1 2 3\n";
        assert_eq!(parse_machine(stat), Some((9030, 5, 2)));
    }

    #[test]
    fn counts_this_process_cpu() {
        let me = std::process::id();
        let mine = |s: &Snapshot| -> u64 { s.processes.get(&me).map_or(0, |(_, t)| *t) };
        let before = Snapshot::take();
        let mut x = 0u64;
        let spin = Instant::now();
        while spin.elapsed().as_millis() < 300 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = Snapshot::take();
        assert!(
            mine(&after) > mine(&before),
            "a spinning process's CPU time did not grow: {}",
            after.since(&before)
        );
    }
}

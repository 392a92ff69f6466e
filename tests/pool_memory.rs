//! Memory limits with a real memory cgroup: a pool too large for its cgroup is an error from
//! `build`, and a task that leaks gets its worker killed by the OOM killer, not the coordinator.
//!
//! The test process itself stays out of the cgroup (the harness runs other tests beside it): each
//! test makes a cgroup of its own and runs this binary again inside it, for one `child_*` test,
//! with [`CHILD_ENV`] set. The shell that starts it writes its own pid into the cgroup before it
//! execs, so the child is charged from its first allocation. Without [`CHILD_ENV`] the `child_*`
//! tests do nothing. Where no cgroup can be made (not root, no memory controller, a read-only
//! mount) the tests say why and pass.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shmexec::shm::memory::{self, Limit};
use shmexec::{Error, Pool};
use support::{builder, serial};

/// Set in a child run inside a test cgroup: the cgroup's name (its last path component).
const CHILD_ENV: &str = "SHMEXEC_TEST_MEMORY_CGROUP";

/// How long a child may run before the test kills it.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A memory cgroup made for one test, removed on drop (after its processes are gone).
struct Cgroup {
    dir: PathBuf,
    version: Version,
}

impl Cgroup {
    /// A new cgroup limited to `limit` bytes of memory and no swap, or why none can be made.
    fn new(limit: u64) -> Result<Cgroup, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("not root".into());
        }
        let (parent, version) = parent_dir()?;
        let name = format!(
            "shmexec-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cgroup = Cgroup { dir, version };
        let (limit_file, swap) = match version {
            Version::V1 => ("memory.limit_in_bytes", "memory.swappiness"),
            Version::V2 => ("memory.max", "memory.swap.max"),
        };
        cgroup.write(limit_file, &limit.to_string())?;
        // No swap, so that a leak meets the OOM killer instead of filling a swap device. Where
        // swap cannot be set there is none to use, or the limit counts it (memsw) too.
        let _ = cgroup.write(swap, "0");
        if version == Version::V1 {
            let _ = cgroup.write("memory.memsw.limit_in_bytes", &limit.to_string());
        }
        Ok(cgroup)
    }

    fn name(&self) -> String {
        self.dir.file_name().unwrap().to_string_lossy().into_owned()
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("cannot write {value} to {}/{file}: {e}", self.dir.display()))
    }

    /// The OOM kills in this cgroup so far.
    fn oom_kills(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// Runs the test `test` of this binary inside the cgroup, as a child (see the module doc).
    fn run(&self, test: &str) -> Output {
        let exe = std::env::current_exe().unwrap();
        let procs = self.dir.join("cgroup.procs");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1" && shift && exec "$@""#)
            .arg("sh")
            .arg(&procs)
            .arg(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, self.name())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > CHILD_DEADLINE {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // rmdir fails while the cgroup has processes: a child's workers may take a moment to
        // follow it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.dir.exists() {
            eprintln!("could not remove the test cgroup {}", self.dir.display());
        }
    }
}

/// Where to make a test cgroup: below this process's own v1 memory cgroup (so that its
/// parent's limits apply too), or at the root of a v2 hierarchy that has the memory
/// controller (elsewhere a v2 cgroup with processes cannot have children with controllers).
fn parent_dir() -> Result<(PathBuf, Version), String> {
    let v2 = Path::new("/sys/fs/cgroup");
    if let Ok(controllers) = std::fs::read_to_string(v2.join("cgroup.controllers")) {
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err("cgroup v2 without the memory controller".into());
        }
        let subtree =
            std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap_or_default();
        if !subtree.split_whitespace().any(|c| c == "memory") {
            std::fs::write(v2.join("cgroup.subtree_control"), "+memory")
                .map_err(|e| format!("cannot enable the memory controller for children: {e}"))?;
        }
        return Ok((v2.to_path_buf(), Version::V2));
    }
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if !v1.join("memory.limit_in_bytes").exists() {
        return Err("no memory cgroup controller mounted at /sys/fs/cgroup/memory".into());
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| v1.join(path.trim_start_matches('/')))
        })
        .filter(|dir| dir.join("memory.limit_in_bytes").exists())
        .unwrap_or_else(|| v1.to_path_buf());
    Ok((own, Version::V1))
}

/// A cgroup of `limit` bytes for this test, or `None` (said on stderr) where none can be made.
fn cgroup_or_skip(limit: u64) -> Option<Cgroup> {
    match Cgroup::new(limit) {
        Ok(cgroup) => Some(cgroup),
        Err(why) => {
            eprintln!("skipped: no test memory cgroup: {why}");
            None
        }
    }
}

/// Panics unless the child exited 0 after running its one test.
fn assert_child_passed(out: &Output) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- child stdout\n{stdout}--- child stderr\n{stderr}---");
    assert!(
        out.status.success(),
        "the child in the cgroup ended with {:?} (signal 9: OOM-killed; exit 101: its test failed)",
        out.status
    );
    assert!(
        stdout.contains("1 passed"),
        "the child ran no test: {stdout}"
    );
}

/// The name of the test cgroup this process runs in, if it is a child.
fn child_cgroup() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

#[test]
fn headroom_reports_the_cgroup_limit_from_inside() {
    let _guard = serial();
    let Some(cgroup) = cgroup_or_skip(200 << 20) else {
        return;
    };
    assert_child_passed(&cgroup.run("child_headroom_reports_the_cgroup_limit"));
}

#[test]
fn child_headroom_reports_the_cgroup_limit() {
    let Some(name) = child_cgroup() else { return };
    let room = memory::headroom();
    println!(
        "headroom: {} under {}",
        memory::Bytes(room.available),
        room.limit
    );
    match &room.limit {
        Limit::Cgroup {
            path, max, usage, ..
        } => {
            assert!(path.ends_with(&format!("/{name}")), "{path}");
            assert_eq!(*max, 200 << 20);
            assert!(*usage > 0 && room.available <= *max, "{room:?}");
        }
        other => panic!("the tightest limit is {other}, not the test cgroup"),
    }
    assert!(room.limit.to_string().contains(&name), "{}", room.limit);
}

#[test]
fn a_pool_larger_than_its_cgroup_is_an_error_from_build() {
    let _guard = serial();
    let Some(cgroup) = cgroup_or_skip(200 << 20) else {
        return;
    };
    assert_child_passed(&cgroup.run("child_a_pool_larger_than_its_cgroup"));
    assert_eq!(cgroup.oom_kills().unwrap_or(0), 0, "nothing was OOM-killed");
}

#[test]
fn child_a_pool_larger_than_its_cgroup() {
    let Some(name) = child_cgroup() else { return };
    let guard = serial();
    let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native());
    // 2 x (64 MiB + 64 MiB) of rings in 200 MiB: without the check, fallocate charges the
    // cgroup past its limit and the OOM killer ends this process.
    let started = Instant::now();
    let r = builder(&guard).workers(2).ring_bytes(64 << 20).build(task);
    match r {
        Err(e @ Error::OutOfMemory { .. }) => {
            let message = e.to_string();
            println!("refused in {:?}: {message}", started.elapsed());
            assert!(message.contains("memory cgroup"), "{message}");
            assert!(message.contains(&name), "{message}");
            assert!(
                message.contains("memory.limit_in_bytes = 200 MiB")
                    || message.contains("memory.max = 200 MiB"),
                "{message}"
            );
            assert!(
                message.contains("2 workers x (64 MiB input ring"),
                "{message}"
            );
            for setting in [
                "Builder::ring_bytes",
                "Builder::workers",
                "Builder::shared_bytes",
            ] {
                assert!(message.contains(setting), "{message}");
            }
        }
        other => panic!("expected Error::OutOfMemory, got {other:?}"),
    }
    // And a pool that fits starts in the same cgroup.
    let task = shmexec::from_fn::<u64, _, _>(|&n| n.to_native() + 1);
    let mut pool = builder(&guard)
        .workers(2)
        .ring_bytes(16 << 20)
        .build(task)
        .expect("a pool of 64 MiB of rings fits 200 MiB");
    let out: Vec<u64> = pool.map(0..10u64).map(|r| r.unwrap().to_native()).collect();
    assert_eq!(out, (1..11).collect::<Vec<_>>());
}

/// The item the leaking task leaks on.
const POISON: u64 = 7;

/// Allocates and touches 64 MiB at a time, keeping all of it, until the OOM killer ends the
/// process.
fn leak() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 64 << 20];
        for page in block.iter_mut().step_by(4096) {
            *page = 1;
        }
        hoard.push(std::hint::black_box(block));
    }
}

#[test]
fn a_task_that_leaks_gets_its_worker_killed_not_the_coordinator() {
    let _guard = serial();
    let Some(cgroup) = cgroup_or_skip(800 << 20) else {
        return;
    };
    let started = Instant::now();
    let out = cgroup.run("child_a_task_that_leaks");
    println!("child ran {:?}", started.elapsed());
    assert_child_passed(&out);
    let kills = cgroup.oom_kills();
    println!("OOM kills in the cgroup: {kills:?}");
    if let Some(kills) = kills {
        assert!(
            kills >= 2,
            "the poison item should have been OOM-killed twice: {kills}"
        );
    }
}

#[test]
fn child_a_task_that_leaks() {
    if child_cgroup().is_none() {
        return;
    }
    let guard = serial();
    let task = shmexec::from_fn::<u64, _, _>(|&n| {
        let n = n.to_native();
        if n == POISON {
            leak();
        }
        n * 2
    });
    // 2 x (128 MiB + 128 MiB) of rings, all mapped in the coordinator: by resident memory alone
    // it outweighs a worker that leaks the remaining ~280 MiB, so only the workers' raised OOM
    // score makes the OOM killer pick the leaking worker.
    let mut pool: Pool<_> = builder(&guard)
        .workers(2)
        .ring_bytes(128 << 20)
        .build(task)
        .expect("pool");
    let own = memory::oom_score_adj().unwrap_or(0);
    for pid in pool.pids() {
        let adj: i32 = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(adj, (own + 500).min(1000), "worker {pid}");
    }
    println!("after build: {}", memory::headroom().limit);

    let started = Instant::now();
    let results: Vec<_> = pool.map(0..20u64).collect();
    println!("20 items with the leak: {:?}", started.elapsed());
    for (n, r) in results.into_iter().enumerate() {
        let n = n as u64;
        match r {
            Ok(out) => {
                assert_ne!(n, POISON);
                assert_eq!(out.to_native(), n * 2);
            }
            Err(Error::WorkerCrashed {
                seq,
                signal,
                crashes,
            }) => {
                assert_eq!(n, POISON);
                assert_eq!(seq, POISON);
                assert_eq!(signal, Some(9));
                assert_eq!(crashes, 2);
            }
            Err(e) => panic!("item {n}: {e}"),
        }
    }
    assert!(pool.stats().respawns >= 2, "{:?}", pool.stats());
    // The pool goes on.
    let again: Vec<u64> = pool
        .map(100..110u64)
        .map(|r| r.unwrap().to_native())
        .collect();
    assert_eq!(again, (100..110).map(|n| n * 2).collect::<Vec<_>>());
}

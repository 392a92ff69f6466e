//! What a task starts dies with its worker: a `sleep 1000` that a task runs and forgets is gone
//! shortly after its worker is killed (and replaced), and after the pool is dropped, in both
//! start modes. (Forked pools: the launcher is a child subreaper and kills the orphans of its
//! workers; spawned pools: each worker leads a process group that the pool kills with it.)
//!
//! Its own `main` (`harness = false` in Cargo.toml): a spawned worker runs `main` from the top,
//! and `serve` must come first. It answers nextest's `--list` itself.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use shmexec::{Pool, Task};

const NAMES: [&str; 2] = [
    "a_forked_workers_children_die_with_it",
    "a_spawned_workers_children_die_with_it",
];

/// How long a forgotten child may outlive its worker.
const GONE_WITHIN: Duration = Duration::from_secs(3);

/// Starts a `sleep 1000` it never waits for, and returns its pid.
fn sleeper_task() -> impl Task<Input = u64, Output = u64> {
    // Forgetting the child is the point: what the pool must clean up after.
    #[allow(clippy::zombie_processes)]
    shmexec::from_fn::<u64, _, _>(|_| {
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("sleep");
        u64::from(child.id())
    })
}

fn main() {
    // In a spawned worker this runs the worker loop and never returns.
    shmexec::spawn::serve("sleeper", sleeper_task);

    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            for name in NAMES {
                println!("{name}: test");
            }
        }
        return;
    }
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected = |name: &str| filters.iter().all(|f| name.contains(f.as_str()));
    let tests: [fn(); 2] = [
        a_forked_workers_children_die_with_it,
        a_spawned_workers_children_die_with_it,
    ];
    let mut ran = 0;
    for (name, test) in NAMES.into_iter().zip(tests) {
        if selected(name) {
            let start = Instant::now();
            test();
            println!("test {name} ... ok ({:.2?})", start.elapsed());
            ran += 1;
        }
    }
    println!("{ran} passed, 0 failed");
}

fn pid(raw: u64) -> rustix::process::Pid {
    rustix::process::Pid::from_raw(raw as i32).expect("a pid")
}

/// A pidfd on a process that runs now (so the number is still its own): it becomes readable
/// when that process exits, whoever its parent is by then.
fn watch(raw: u64) -> OwnedFd {
    rustix::process::pidfd_open(pid(raw), rustix::process::PidfdFlags::empty()).expect("pidfd")
}

fn exits_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

/// The parent of `raw`, from `/proc/<pid>/stat`.
fn parent_of(raw: u64) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{raw}/stat")).expect("stat");
    // The command name may hold spaces: the fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split(' ')
        .nth(1)
        .expect("ppid")
        .parse()
        .expect("a pid")
}

fn assert_no_children() {
    let r = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG);
    assert!(
        matches!(r, Err(rustix::io::Errno::CHILD)),
        "a worker outlived the pool: {r:?}"
    );
}

/// Runs one item; returns its output.
fn run_one(pool: &mut Pool<impl Task<Input = u64, Output = u64>>, i: u64) -> u64 {
    let mut out: Vec<u64> = pool
        .map([i])
        .map(|r| r.expect("the item succeeds").to_native())
        .collect();
    out.pop().expect("one result")
}

/// One worker; its first item starts a sleeper, the worker is killed, the next item (run by
/// the replacement) starts another; the first must go once the replacement is up, the second
/// once the pool is dropped.
fn children_die_with_their_worker(mut pool: Pool<impl Task<Input = u64, Output = u64>>) {
    let worker = pool.pids()[0];
    let first = run_one(&mut pool, 0);
    assert_eq!(parent_of(first), worker, "the task's child is its worker's");
    let first_fd = watch(first);
    rustix::process::kill_process(pid(worker as u64), rustix::process::Signal::KILL).unwrap();
    let second = run_one(&mut pool, 1);
    assert_eq!(pool.stats().respawns, 1);
    assert_ne!(pool.pids()[0], worker);
    let second_fd = watch(second);
    let first_gone = exits_within(&first_fd, GONE_WITHIN);
    drop(pool);
    let second_gone = exits_within(&second_fd, GONE_WITHIN);
    // Whatever failed, leave nothing running (a sleeper holds this test's stdout open).
    for fd in [&first_fd, &second_fd] {
        let _ = rustix::process::pidfd_send_signal(fd, rustix::process::Signal::KILL);
    }
    assert!(
        first_gone,
        "the child of a killed worker still runs after its replacement started"
    );
    assert!(
        second_gone,
        "a worker's child still runs after the pool was dropped"
    );
    assert_no_children();
}

fn a_forked_workers_children_die_with_it() {
    // Built while this program has one thread.
    let pool = Pool::builder()
        .workers(1)
        .ring_bytes(1 << 16)
        .build(sleeper_task())
        .expect("forked pool");
    children_die_with_their_worker(pool);
}

fn a_spawned_workers_children_die_with_it() {
    let pool = Pool::builder()
        .workers(1)
        .ring_bytes(1 << 16)
        .spawn("sleeper")
        .build(sleeper_task())
        .expect("spawned pool");
    children_die_with_their_worker(pool);
}

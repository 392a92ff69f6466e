//! Pools used from a program that runs four busy threads: a forked pool built before the
//! threads started, whose replacements come from its launcher (a copy of the program made at
//! `build`), and pools with the `spawn` start method (workers are this program started again),
//! built while the threads run. Either way no thread's lock is copied into a worker.
//!
//! This test binary has its own `main` (`harness = false` in Cargo.toml) because a spawned
//! worker runs `main` from the top, and `serve` must come first. It answers nextest's
//! `--list` itself.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmexec::shared::Span;
use shmexec::{Error, Pool, Samples, Task};

const NAMES: [&str; 6] = [
    "fork_pool_replaces_workers_while_threads_run",
    "spawn_from_a_threaded_program",
    "spawned_workers_prove_their_task",
    "a_replacement_outlives_the_thread_that_started_it",
    "a_replacement_runs_the_program_the_pool_started_with",
    "spawn_program_runs_the_program_with_its_arguments",
];

/// The argument [`spawn_program_runs_the_program_with_its_arguments`] gives its workers.
const WORKER_FLAG: &str = "--worker-flag";

/// The argument that makes this program the coordinator of
/// [`a_replacement_runs_the_program_the_pool_started_with`], run from a copy of its file.
const MOVED_COORDINATOR: &str = "--moved-coordinator";

fn sum_task() -> impl Task<Input = Vec<i32>, Output = i64> {
    shmexec::from_fn::<Vec<i32>, _, _>(|c| {
        std::thread::sleep(Duration::from_micros(200));
        c.samples().iter().map(|&x| x as i64).sum::<i64>()
    })
}

/// Sums a span of the pool's shared region, read in place.
fn span_sum_task() -> impl Task<Input = Span<i32>, Output = i64> {
    shmexec::try_from_fn::<Span<i32>, _, _>(|s| Ok(s.get()?.iter().map(|&x| x as i64).sum::<i64>()))
}

/// Says whether the worker's own arguments hold [`WORKER_FLAG`], and where it runs from.
fn argv_task() -> impl Task<Input = u8, Output = (bool, String)> {
    shmexec::from_fn::<u8, _, _>(|_| {
        let args: Vec<String> = std::env::args().collect();
        (args.iter().any(|a| a == WORKER_FLAG), args[0].clone())
    })
}

fn spawn_program_runs_the_program_with_its_arguments() {
    let program = std::env::current_exe().unwrap();
    let mut pool = Pool::builder()
        .workers(2)
        .spawn_program("argv", &program, [WORKER_FLAG])
        .build(argv_task())
        .unwrap();
    for r in pool.map(vec![0u8; 4]) {
        let (flagged, arg0) = r.unwrap().deserialize().unwrap();
        assert!(flagged, "the worker did not get the program's arguments");
        assert_eq!(
            arg0,
            program.to_string_lossy(),
            "argv[0] is the program as given"
        );
    }
    // The workers' arguments come first: a program that serves no such name says so.
    match Pool::builder()
        .workers(1)
        .spawn_program("no_such_task", &program, [WORKER_FLAG])
        .build(sum_task())
    {
        Err(Error::Init { .. }) => {}
        other => panic!("an unknown task name must fail the build: {other:?}"),
    }
    drop(pool);
    assert_no_children();
}

fn main() {
    // In a spawned worker this runs the worker loop and never returns.
    shmexec::spawn::serve("sum", sum_task);
    shmexec::spawn::serve("span_sum", span_sum_task);
    shmexec::spawn::serve("argv", argv_task);

    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == MOVED_COORDINATOR) {
        coordinate_after_the_file_is_replaced();
        return;
    }
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
    let tests: [fn(); 6] = [
        fork_pool_replaces_workers_while_threads_run,
        spawn_from_a_threaded_program,
        spawned_workers_prove_their_task,
        a_replacement_outlives_the_thread_that_started_it,
        a_replacement_runs_the_program_the_pool_started_with,
        spawn_program_runs_the_program_with_its_arguments,
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

/// Four threads that keep taking a lock and allocating: what a fork would copy in whatever
/// state they happen to be. Stopped and joined by [`Busy::stop`].
struct Busy {
    stop: Arc<AtomicBool>,
    spins: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start() -> Busy {
        let stop = Arc::new(AtomicBool::new(false));
        let lock = Arc::new(Mutex::new(0u64));
        let spins = Arc::new(AtomicU64::new(0));
        let threads = (0..4)
            .map(|_| {
                let (stop, lock, spins) = (stop.clone(), lock.clone(), spins.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let mut g = lock.lock().unwrap();
                        *g += 1;
                        let v: Vec<u64> = (0..64).collect();
                        std::hint::black_box(&v);
                        drop(g);
                        spins.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        assert!(shmexec::shm::process::thread_count() >= 5);
        Busy {
            stop,
            spins,
            threads,
        }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        assert!(self.spins.load(Ordering::Relaxed) > 0);
    }
}

fn assert_no_children() {
    let r = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG);
    assert!(
        matches!(r, Err(rustix::io::Errno::CHILD)),
        "a worker outlived the pool: {r:?}"
    );
}

fn kill(pid: i32) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
}

fn fork_pool_replaces_workers_while_threads_run() {
    // Built while this program has one thread: the default start method (fork) is allowed.
    let mut pool = Pool::builder()
        .workers(2)
        .ring_bytes(1 << 20)
        .build(sum_task())
        .expect("forked pool");
    let busy = Busy::start();
    let n = 2000;
    let got = std::thread::scope(|s| {
        let (tx, rx) = pool.stream();
        s.spawn(move || {
            for i in 0..n {
                tx.send(&vec![i; 100]).expect("send");
            }
        });
        s.spawn(move || {
            let start = Instant::now();
            let mut got = Vec::new();
            while let Some(r) = rx.recv() {
                got.push(r.expect("every item succeeds").to_native());
                // Kill a worker three times while results stream: the first two originals,
                // then the first one's replacement.
                match got.len() {
                    300 => kill(rx.worker_pids()[0]),
                    900 => kill(rx.worker_pids()[1]),
                    1500 => kill(rx.worker_pids()[0]),
                    _ => {}
                }
                assert!(start.elapsed() < Duration::from_secs(60), "stuck");
            }
            got
        })
        .join()
        .unwrap()
    });
    assert_eq!(got, (0..n).map(|i| 100 * i as i64).collect::<Vec<_>>());
    assert_eq!(pool.stats().respawns, 3);
    drop(pool);
    busy.stop();
    assert_no_children();
}

fn spawn_from_a_threaded_program() {
    let busy = Busy::start();
    // Fork is refused here...
    match Pool::builder().workers(2).build(sum_task()) {
        Err(e @ Error::Start(_)) => assert!(e.to_string().contains("threads"), "{e}"),
        other => panic!("fork from a threaded process: {other:?}"),
    }
    // ... spawn works, and so does replacing a killed worker.
    {
        let mut pool = Pool::builder()
            .workers(2)
            .ring_bytes(1 << 20)
            .spawn("sum")
            .build(sum_task())
            .expect("spawned pool");
        let inputs: Vec<Vec<i32>> = (0..400).map(|i| vec![i; 100]).collect();
        let start = Instant::now();
        for (i, r) in pool.map(&inputs).enumerate() {
            assert_eq!(r.unwrap().to_native(), 100 * i as i64);
            assert!(start.elapsed() < Duration::from_secs(60), "stuck");
        }
        let victim = pool.pids()[0];
        kill(victim);
        let sums: Vec<i64> = pool.map(&inputs).map(|r| r.unwrap().to_native()).collect();
        assert_eq!(sums, (0..400).map(|i| 100 * i as i64).collect::<Vec<_>>());
        assert_eq!(pool.stats().respawns, 1);
        assert_ne!(pool.pids()[0], victim);
    }
    // A spawned worker maps the shared region from its inherited descriptor.
    {
        let mut pool = Pool::builder()
            .workers(2)
            .ring_bytes(1 << 20)
            .shared_bytes(400 * 100 * 4)
            .spawn("span_sum")
            .build(span_sum_task())
            .expect("spawned pool with a shared region");
        for (i, x) in pool.shared_mut::<i32>().unwrap().iter_mut().enumerate() {
            *x = (i / 100) as i32;
        }
        let sums: Vec<i64> = pool
            .map((0..400).map(|i| Span::new(i * 100, 100)))
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(sums, (0..400).map(|i| 100 * i as i64).collect::<Vec<_>>());
    }
    busy.stop();
    assert_no_children();
}

fn spawned_workers_prove_their_task() {
    // A pool that expects other types than the task served under that name: the worker says
    // so at start-up, instead of reading the wrong types (any bytes pass for numbers).
    let wrong =
        shmexec::from_fn::<Vec<f32>, _, _>(|c| c.samples().iter().map(|&x| x as f64).sum::<f64>());
    match Pool::builder().workers(2).spawn("sum").build(wrong) {
        Err(e @ Error::Init { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("Vec<i32> -> i64") && msg.contains("Vec<f32> -> f64"),
                "{msg}"
            );
        }
        other => panic!("a type mismatch must fail the build: {other:?}"),
    }
    // A name no `serve` in main answers: the spawned program would run its own main again. It
    // stops at its first `build` (this binary's first test) and says what is missing.
    match Pool::builder()
        .workers(1)
        .spawn("no_such_task")
        .build(sum_task())
    {
        Err(e @ Error::Init { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("serve(\"no_such_task\""), "{msg}");
        }
        other => panic!("an unknown task name must fail the build: {other:?}"),
    }
    assert_no_children();
}

/// The state letter of `pid` in `/proc/<pid>/stat` (`None`: no such process).
fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields after it follow the last ')'.
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Whether `pid` runs (a zombie, killed and not reaped yet, does not).
fn runs(pid: i32) -> bool {
    !matches!(state_of(pid), None | Some('Z') | Some('X'))
}

fn sums(pool: &mut Pool<impl Task<Input = Vec<i32>, Output = i64>>) -> Vec<i64> {
    let inputs: Vec<Vec<i32>> = (0..400).map(|i| vec![i; 100]).collect();
    let start = Instant::now();
    pool.map(&inputs)
        .map(|r| {
            assert!(start.elapsed() < Duration::from_secs(60), "stuck");
            r.expect("every item succeeds").to_native()
        })
        .collect()
}

fn expected_sums() -> Vec<i64> {
    (0..400).map(|i| 100 * i as i64).collect()
}

fn a_replacement_outlives_the_thread_that_started_it() {
    let mut pool = Pool::builder()
        .workers(2)
        .ring_bytes(1 << 20)
        .spawn("sum")
        .build(sum_task())
        .expect("spawned pool");
    let victim = pool.pids()[0];
    kill(victim);
    let start = Instant::now();
    while runs(victim) {
        assert!(start.elapsed() < Duration::from_secs(10), "the kill took");
        std::thread::sleep(Duration::from_millis(1));
    }
    // One call on a thread that then exits: the call finds the death and starts the
    // replacement on that thread's watch (a tokio blocking thread that respawns inline).
    std::thread::scope(|s| {
        s.spawn(|| assert_eq!(sums(&mut pool), expected_sums()));
    });
    assert_eq!(pool.stats().respawns, 1);
    let replacement = pool.pids()[0];
    assert_ne!(replacement, victim);
    // The thread is gone; a death signal tied to it would have fired at its exit.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        assert!(
            runs(replacement),
            "the replacement died {:?} after the thread that started it ended",
            watched.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sums(&mut pool), expected_sums());
    assert_eq!(
        pool.stats().respawns,
        1,
        "the replacement served, nothing died"
    );
    drop(pool);
    assert_no_children();
}

/// Runs a copy of this program, from a directory of its own, as [`MOVED_COORDINATOR`]: it
/// builds a spawned pool, replaces its own file with another program, kills a worker and needs
/// a replacement.
fn a_replacement_runs_the_program_the_pool_started_with() {
    let dir = std::env::temp_dir().join(format!("shmexec-moved-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("coordinator");
    std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
    let log = dir.join("out");
    let mut child = std::process::Command::new(&copy)
        .arg(MOVED_COORDINATOR)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("run the copy");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the coordinator run from a replaced file is stuck");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(status.success(), "{status:?}: {out}");
    assert!(out.contains("the replacement served"), "{out}");
    assert_no_children();
}

/// [`MOVED_COORDINATOR`]'s part, in the copy.
fn coordinate_after_the_file_is_replaced() {
    let mut pool = Pool::builder()
        .workers(2)
        .ring_bytes(1 << 20)
        .spawn("sum")
        .build(sum_task())
        .expect("spawned pool");
    assert_eq!(sums(&mut pool), expected_sums());
    // An upgrade on disk: the file goes, another program takes its name.
    let me = std::env::current_exe().unwrap();
    std::fs::remove_file(&me).unwrap();
    std::fs::write(&me, "#!/bin/sh\nexit 7\n").unwrap();
    std::fs::set_permissions(&me, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let link = std::fs::read_link("/proc/self/exe").unwrap();
    assert!(link.to_string_lossy().ends_with(" (deleted)"), "{link:?}");
    let victim = pool.pids()[0];
    kill(victim);
    assert_eq!(sums(&mut pool), expected_sums());
    assert_eq!(pool.stats().respawns, 1);
    assert_ne!(pool.pids()[0], victim);
    drop(pool);
    assert_no_children();
    println!("the replacement served");
}

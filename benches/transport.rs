//! Transport benchmarks, each beside the floor it is judged against, measured in the same run:
//!
//! - `roundtrip/*`: a 64 B frame to a forked echo process and back, through two rings, with
//!   each [`WaitStrategy`]; beside ping-pong on one bare shared `AtomicU32` (spinning, and with a
//!   futex wait/wake per hop) and through two pipes.
//! - `stream/*`: 64 KiB and 4 MiB frames copied into a ring and released by a forked consumer;
//!   beside `memcpy` of the same sizes.
//!
//! After criterion's own output it prints the ratios to the floors, and the CPU time an idle
//! waiter burns in one second for each strategy.
//!
//! `cargo bench --bench transport` (add `-- roundtrip` or `-- stream` to run one group).

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput};
use shmexec_shm::{
    ChildProcess, Consumer, FrameKind, Peer, Producer, Ring, Segment, WaitStrategy, fork, futex,
};

const PING: usize = 64;

fn parent_peer() -> Peer {
    Peer::process(std::process::id() as i32).expect("parent alive")
}

// ---------------------------------------------------------------- round trips

/// The ways a 64 B message can go to a forked echo process and back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    /// One bare shared word for both directions: the absolute floor.
    RawSpin,
    /// One bare word per direction, each in its own cache line, as two rings must have.
    RawSpin2Lines,
    /// One bare word, with a futex wait/wake per hop.
    RawFutex,
    /// Two rings, both ends waiting with this strategy.
    Ring(WaitStrategy),
    /// Two pipes.
    Pipe,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::RawSpin => "raw_spin",
            Route::RawSpin2Lines => "raw_spin_2lines",
            Route::RawFutex => "raw_futex",
            Route::Ring(WaitStrategy::Spin) => "ring_spin",
            Route::Ring(WaitStrategy::Park) => "ring_futex",
            Route::Ring(_) => "ring_adaptive",
            Route::Pipe => "pipe",
        }
    }
}

/// A running echo process and the parent's end of the route to it. Dropping it kills and
/// reaps the child (`ChildProcess`'s drop).
#[allow(clippy::large_enum_variant)] // one of each per benchmark, never in a collection
enum Echo {
    Raw {
        _child: ChildProcess,
        words: Words,
        two_lines: bool,
        futex: bool,
        v: u32,
    },
    Ring {
        _child: ChildProcess,
        tx: Producer,
        rx: Consumer,
    },
    Pipe {
        _child: ChildProcess,
        down: OwnedFd,
        up: OwnedFd,
    },
}

impl Echo {
    fn start(route: Route) -> Echo {
        match route {
            Route::RawSpin => Echo::raw(false, false),
            Route::RawSpin2Lines => Echo::raw(false, true),
            Route::RawFutex => Echo::raw(true, false),
            Route::Ring(strategy) => Echo::ring(strategy),
            Route::Pipe => Echo::pipe(),
        }
    }

    /// `n` round trips; the time they took.
    fn round_trips(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        match self {
            Echo::Raw {
                words,
                two_lines,
                futex,
                v,
                ..
            } => {
                let (tx, rx) = (words.get(0), words.get(usize::from(*two_lines)));
                for _ in 0..n {
                    // Odd values go down, the next even value comes back.
                    *v = if *v >= u32::MAX - 2 { 1 } else { *v + 2 };
                    raw_store(tx, *v, *futex);
                    let want = *v + 1;
                    raw_wait(rx, |r| r == want, *futex);
                }
            }
            Echo::Ring { tx, rx, .. } => {
                let payload = [7u8; PING];
                for _ in 0..n {
                    tx.send(&payload).unwrap();
                    let reply = rx.peek().unwrap();
                    black_box(&*reply);
                    reply.release();
                }
            }
            Echo::Pipe { down, up, .. } => {
                let mut buf = [1u8; PING];
                for _ in 0..n {
                    rustix::io::write(&*down, &buf).unwrap();
                    assert!(read_exact(up, &mut buf));
                }
            }
        }
        start.elapsed()
    }

    fn raw(futex: bool, two_lines: bool) -> Echo {
        let words = Words::new();
        let child_words = Words {
            seg: words.seg.clone(),
        };
        let child = fork(move || {
            let (rx, tx) = (child_words.get(0), child_words.get(usize::from(two_lines)));
            let mut answered = 0;
            loop {
                let v = raw_wait(rx, |v| v % 2 == 1 && v != answered, futex);
                answered = v;
                raw_store(tx, v + 1, futex);
            }
        })
        .unwrap();
        Echo::Raw {
            _child: child,
            words,
            two_lines,
            futex,
            v: u32::MAX,
        }
    }

    fn ring(strategy: WaitStrategy) -> Echo {
        let (to_child, to_parent) = (
            Ring::create(1 << 16).unwrap(),
            Ring::create(1 << 16).unwrap(),
        );
        let (a, b) = (to_child.clone(), to_parent.clone());
        let child = fork(move || {
            let mut rx = a.consumer(parent_peer()).unwrap();
            let mut tx = b.producer(parent_peer()).unwrap();
            rx.set_wait_strategy(strategy);
            tx.set_wait_strategy(strategy);
            loop {
                let Ok(frame) = rx.peek() else { return 0 };
                let Ok(mut reply) = tx.reserve(frame.len()) else {
                    return 1;
                };
                reply.copy_from_slice(&frame);
                reply.commit();
                frame.release();
            }
        })
        .unwrap();
        let mut tx = to_child.producer(child.peer().unwrap()).unwrap();
        let mut rx = to_parent.consumer(child.peer().unwrap()).unwrap();
        tx.set_wait_strategy(strategy);
        rx.set_wait_strategy(strategy);
        Echo::Ring {
            _child: child,
            tx,
            rx,
        }
    }

    fn pipe() -> Echo {
        let (down_r, down_w) = rustix::pipe::pipe().unwrap();
        let (up_r, up_w) = rustix::pipe::pipe().unwrap();
        let child = fork(move || {
            let mut buf = [0u8; PING];
            loop {
                if !read_exact(&down_r, &mut buf) {
                    return 0;
                }
                if rustix::io::write(&up_w, &buf) != Ok(PING) {
                    return 1;
                }
            }
        })
        .unwrap();
        Echo::Pipe {
            _child: child,
            down: down_w,
            up: up_r,
        }
    }
}

/// Shared `AtomicU32`s for the raw floors: word 0 at the start of the segment, word 1 a page
/// further (never in the same cache line).
struct Words {
    seg: Arc<Segment>,
}

impl Words {
    fn new() -> Words {
        Words {
            seg: Arc::new(Segment::new(8192).unwrap()),
        }
    }
    fn get(&self, i: usize) -> &AtomicU32 {
        self.seg.atomic_u32(4096 * i).expect("word 0 or 1")
    }
}

/// Waits until `done(value)`, spinning or sleeping on the futex; returns the value.
fn raw_wait(w: &AtomicU32, done: impl Fn(u32) -> bool, use_futex: bool) -> u32 {
    loop {
        let v = w.load(Ordering::Acquire);
        if done(v) {
            return v;
        }
        if use_futex {
            futex::wait(w, v, Some(Duration::from_millis(100)));
        } else {
            std::hint::spin_loop();
        }
    }
}

fn raw_store(w: &AtomicU32, v: u32, use_futex: bool) {
    w.store(v, Ordering::Release);
    if use_futex {
        futex::wake_all(w);
    }
}

fn read_exact(fd: &OwnedFd, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    true
}

const ROUTES: [Route; 7] = [
    Route::RawSpin,
    Route::RawSpin2Lines,
    Route::RawFutex,
    Route::Ring(WaitStrategy::Spin),
    Route::Ring(WaitStrategy::Park),
    Route::Ring(WaitStrategy::Adaptive),
    Route::Pipe,
];

fn bench_roundtrips(c: &mut Criterion) {
    let mut group = c.benchmark_group("roundtrip");
    for route in ROUTES {
        let mut echo = Echo::start(route);
        group.bench_function(route.name(), |b| b.iter_custom(|n| echo.round_trips(n)));
    }
    group.finish();
}

/// Time per round trip over about `budget` of round trips, on a fresh echo process.
fn per_round_trip(route: Route, budget: Duration) -> f64 {
    let mut echo = Echo::start(route);
    echo.round_trips(1000); // warm up: caches, the child's first page faults
    let (mut n, mut spent) = (0u64, Duration::ZERO);
    let mut batch = 100;
    while spent < budget {
        spent += echo.round_trips(batch);
        n += batch;
        batch = (batch * 2).min(1 << 20);
    }
    spent.as_nanos() as f64 / n as f64
}

/// Ratio `ours / floor` measured as pairs taken back to back, so that both sides of each pair
/// meet the same machine load; returns (median, min, max) over the pairs.
fn paired_ratio(ours: Route, floor: Route) -> (f64, f64, f64, f64, f64) {
    let mut ratios = Vec::new();
    let (mut a_all, mut b_all) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let b = per_round_trip(floor, Duration::from_millis(150));
        let a = per_round_trip(ours, Duration::from_millis(150));
        ratios.push(a / b);
        a_all.push(a);
        b_all.push(b);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (lo, hi) = (
        ratios.iter().cloned().fold(f64::MAX, f64::min),
        ratios.iter().cloned().fold(0.0, f64::max),
    );
    (med(&mut ratios), lo, hi, med(&mut a_all), med(&mut b_all))
}

// ---------------------------------------------------------------- streaming

/// Forks a consumer that releases every frame (touching its first and last byte) and answers
/// each `End` frame on the return ring, so the producer can time whole batches.
fn bench_stream(c: &mut Criterion, frame: usize, ring: usize, label: &str) {
    let (data, acks) = (Ring::create(ring).unwrap(), Ring::create(4096).unwrap());
    let (d, a) = (data.clone(), acks.clone());
    let mut child = fork(move || {
        let mut rx = d.consumer(parent_peer()).unwrap();
        let mut tx = a.producer(parent_peer()).unwrap();
        let mut sink = 0u8;
        loop {
            let Ok(f) = rx.peek() else { return 0 };
            if f.kind() == FrameKind::End {
                f.release();
                if tx.send(&[sink]).is_err() {
                    return 1;
                }
                continue;
            }
            if let (Some(first), Some(last)) = (f.first(), f.last()) {
                sink = sink.wrapping_add(*first ^ *last);
            }
            f.release();
        }
    })
    .unwrap();
    let mut tx = data.producer(child.peer().unwrap()).unwrap();
    let mut rx = acks.consumer(child.peer().unwrap()).unwrap();
    let src: Vec<u8> = (0..frame).map(|i| i as u8).collect();
    let mut dst = vec![0u8; frame];

    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Bytes(frame as u64));
    group.bench_function(format!("ring_{label}"), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let mut g = tx.reserve(frame).unwrap();
                g.copy_from_slice(&src);
                g.commit();
            }
            tx.send_end().unwrap();
            rx.peek().unwrap().release();
            start.elapsed()
        })
    });
    group.bench_function(format!("memcpy_{label}"), |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    group.finish();
    drop((tx, rx));
    child.wait_timeout(Duration::from_secs(10)).unwrap();
}

// ---------------------------------------------------------------- idle cost

fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time burnt by a consumer waiting one second on an empty ring.
fn idle_cpu(strategy: WaitStrategy) -> Duration {
    let ring = Ring::create(4096).unwrap();
    let _tx = ring.producer(Peer::unwatched()).unwrap();
    let mut rx = ring.consumer(Peer::unwatched()).unwrap();
    rx.set_wait_strategy(strategy);
    let before = process_cpu();
    let r = rx.peek_timeout(Duration::from_secs(1));
    assert!(r.is_err(), "nothing was sent");
    process_cpu() - before
}

// ---------------------------------------------------------------- report

/// Median time per iteration (ns) that criterion saved for `group/name` in this run, if any.
fn median_ns(group: &str, name: &str, since: SystemTime) -> Option<f64> {
    let dir = std::env::var_os("CRITERION_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(|t| std::path::PathBuf::from(t).join("criterion"))
        })
        .or_else(|| {
            // <target>/<profile>/deps/<bench binary>
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.parent()?.join("criterion"))
        })?;
    let path = dir
        .join(group)
        .join(name)
        .join("new")
        .join("estimates.json");
    if std::fs::metadata(&path).and_then(|m| m.modified()).ok()? < since {
        return None; // from an earlier run
    }
    let json = std::fs::read_to_string(path).ok()?;
    let median = &json[json.find("\"median\"")?..];
    let value = &median[median.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = value.find([',', '}'])?;
    value[..end].trim().parse().ok()
}

fn report(since: SystemTime) {
    println!("\n== shmexec-shm transport: ratios to the floors, this run ==");
    if median_ns("roundtrip", "ring_spin", since).is_some() {
        println!(
            "round trips of a {PING} B frame, as 7 back-to-back pairs of fresh runs (median ratio [min, max]):"
        );
        let pairs = [
            (
                Route::Ring(WaitStrategy::Park),
                Route::RawFutex,
                "want <= 1.5",
            ),
            (Route::Ring(WaitStrategy::Spin), Route::RawSpin, "want <= 2"),
            (
                Route::Ring(WaitStrategy::Adaptive),
                Route::RawSpin,
                "want <= 2",
            ),
            (
                Route::Ring(WaitStrategy::Spin),
                Route::RawSpin2Lines,
                "one line per direction",
            ),
            (
                Route::RawSpin2Lines,
                Route::RawSpin,
                "price of a line per direction",
            ),
        ];
        for (ours, floor, rule) in pairs {
            let (ratio, lo, hi, a, b) = paired_ratio(ours, floor);
            println!(
                "  {:<34} {a:>9.0} ns vs {b:>9.0} ns  ratio {ratio:>5.2} [{lo:.2}, {hi:.2}]  ({rule})",
                format!("{} / {}", ours.name(), floor.name())
            );
        }
    }
    for label in ["64KiB", "4MiB"] {
        let bytes = if label == "4MiB" {
            4u64 << 20
        } else {
            64 << 10
        };
        let ring = median_ns("stream", &format!("ring_{label}"), since);
        let copy = median_ns("stream", &format!("memcpy_{label}"), since);
        if let (Some(ring), Some(copy)) = (ring, copy) {
            let (gr, gc) = (bytes as f64 / ring, bytes as f64 / copy);
            let rule = if label == "4MiB" {
                "want >= 0.8"
            } else {
                "for scale"
            };
            println!(
                "  {:<34} {gr:>7.2} GB/s vs {gc:>7.2} GB/s  ratio {:>5.2}  ({rule})",
                format!("stream {label}: ring / memcpy"),
                gr / gc
            );
        }
    }
    for strategy in [
        WaitStrategy::Adaptive,
        WaitStrategy::Park,
        WaitStrategy::Spin,
    ] {
        let cpu = idle_cpu(strategy);
        println!(
            "  {:<34} {:>7.2} ms CPU in 1 s ({:.2}%)",
            format!("idle waiter, {strategy:?}"),
            cpu.as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 100.0
        );
    }
}

fn main() {
    let since = SystemTime::now();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_roundtrips(&mut c);
    bench_stream(&mut c, 64 << 10, 4 << 20, "64KiB");
    bench_stream(&mut c, 4 << 20, 16 << 20, "4MiB");
    c.final_summary();
    report(since);
}

//! Pipelines of fused stages with real worker processes: every stage kind, results in input
//! order against a sequential reference, errors that name their stage and take the item's
//! place, crashes in a middle stage, per-stage counters.

mod support;

use std::path::PathBuf;

use shmexec::pipeline::Pipeline;
use shmexec::{BoxError, Error, OutputSink, Samples, Task, WorkerInfo};
use support::{assert_no_children, builder, serial};

/// The reference: what the pipeline of [`three_stages`] gives for chunk `i`.
fn reference(i: u64) -> Vec<u64> {
    let chunk: Vec<f32> = (0..64).map(|j| (i * 64 + j) as f32).collect();
    let doubled: Vec<f32> = chunk.iter().map(|x| x * 2.0).collect();
    if !doubled.iter().any(|&x| x as u64 % 5 == 0 && i % 4 != 3) {
        return vec![];
    }
    doubled
        .chunks(16)
        .map(|c| c.iter().map(|&x| x as u64).sum::<u64>())
        .collect()
}

fn chunk(i: u64) -> Vec<f32> {
    (0..64).map(|j| (i * 64 + j) as f32).collect()
}

/// map (double) -> filter (drops every fourth chunk) -> flat_map (one sum per 16 samples).
fn three_stages(guard: &std::sync::MutexGuard<'static, ()>) -> Pipeline<Vec<f32>, u64> {
    Pipeline::<Vec<f32>>::builder()
        .map_fn("double", |c| {
            c.samples().iter().map(|x| x * 2.0).collect::<Vec<f32>>()
        })
        .filter("keep", |c| {
            // The chunk's index is its first sample / 128.
            let first = c.samples()[0] as u64 / 128;
            first % 4 != 3 && c.samples().iter().any(|&x| x as u64 % 5 == 0)
        })
        .flat_map("sums", |c| {
            c.samples()
                .chunks(16)
                .map(|s| s.iter().map(|&x| x as u64).sum::<u64>())
                .collect::<Vec<u64>>()
        })
        .build(builder(guard).workers(2))
        .expect("pipeline")
}

#[test]
fn fused_stages_give_the_reference_in_input_order() {
    let guard = serial();
    {
        let mut p = three_stages(&guard);
        assert_eq!(p.plan().fused(), vec![vec!["double", "keep", "sums"]]);
        assert_eq!(p.plan().workers(), vec![2]);
        let chunks: Vec<Vec<f32>> = (0..400).map(chunk).collect();
        let got: Vec<u64> = p.run(&chunks).map(|r| r.unwrap().to_native()).collect();
        let want: Vec<u64> = (0..400).flat_map(reference).collect();
        assert_eq!(got, want);

        let stats = p.stats();
        let [double, keep, sums] = &stats.stages[..] else {
            panic!("three stages: {stats:?}");
        };
        assert_eq!(double.items, 400);
        assert_eq!(double.outputs, 400);
        assert_eq!(keep.items, 400);
        let kept = (0..400).filter(|&i| !reference(i).is_empty()).count() as u64;
        assert_eq!(keep.outputs, kept);
        // The filter passes its input on as it is.
        assert_eq!(keep.bytes_out, double.bytes_out * kept / 400);
        assert_eq!(sums.items, kept);
        assert_eq!(sums.outputs, want.len() as u64);
        assert!(stats.bottleneck().is_some());
        // A second run numbers its items on from the first.
        let again: Vec<u64> = p.run(&chunks[..10]).map(|r| r.unwrap().seq()).collect();
        assert_eq!(again.first(), Some(&400));
        assert_eq!(p.stats().since(&stats).stages[0].items, 10);
    }
    assert_no_children();
}

#[test]
fn a_failing_stage_is_named_and_the_item_goes_no_further() {
    let guard = serial();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("plus_one", |&n| n.to_native() + 1)
            .map(
                "picky",
                shmexec::try_from_fn::<u64, _, _>(|&n| {
                    let n = n.to_native();
                    match n % 10 {
                        3 => Err(format!("{n} is unlucky").into()),
                        7 => panic!("{n} is worse"),
                        _ => Ok(n * 100),
                    }
                }),
            )
            .map_fn("last", |&n| n.to_native() + 5)
            .build(builder(&guard).workers(2))
            .unwrap();
        let results: Vec<_> = p.run(0..50u64).collect();
        assert_eq!(results.len(), 50);
        for (i, r) in results.into_iter().enumerate() {
            let n = i as u64 + 1;
            match (n % 10, r) {
                (3, Err(Error::Stage { stage, error })) => {
                    assert_eq!(stage, "picky");
                    assert!(
                        matches!(*error, Error::Task { seq, ref message } if seq == i as u64 && message.contains("unlucky")),
                        "{error}"
                    );
                }
                (7, Err(Error::Stage { stage, error })) => {
                    assert_eq!(stage, "picky");
                    assert!(matches!(*error, Error::Panic { .. }), "{error}");
                }
                (_, Ok(v)) => assert_eq!(v.to_native(), n * 100 + 5),
                (_, other) => panic!("item {i}: {other:?}"),
            }
        }
        let stats = p.stats();
        assert_eq!(stats.stages[1].errors, 10);
        // The items that failed in `picky` never reached `last`.
        assert_eq!(stats.stages[2].items, 40);
        let e = Error::Stage {
            stage: "picky".into(),
            error: Box::new(Error::Task {
                seq: 2,
                message: "x".into(),
            }),
        };
        assert_eq!(e.seq(), Some(2));
        assert!(e.to_string().starts_with("stage 'picky': "), "{e}");
    }
    assert_no_children();
}

/// A stage whose `init` and `finish` write marker files, and that kills its worker the first
/// time it sees item 5 (a marker file says it did).
struct CrashOnce {
    dir: PathBuf,
}

impl Task for CrashOnce {
    type Input = u64;
    type Output = u64;
    fn init(&mut self, w: &WorkerInfo) -> Result<(), BoxError> {
        std::fs::write(
            self.dir.join(format!("init-{}", std::process::id())),
            [w.index as u8],
        )?;
        Ok(())
    }
    fn process(&mut self, n: &rkyv::Archived<u64>) -> Result<u64, BoxError> {
        let n = n.to_native();
        let marker = self.dir.join("crashed");
        if n == 6 && !marker.exists() {
            std::fs::write(&marker, b"")?;
            std::process::abort();
        }
        Ok(n * 3)
    }
    fn finish(&mut self, _: &WorkerInfo) {
        let _ = std::fs::write(self.dir.join(format!("finish-{}", std::process::id())), b"");
    }
}

#[test]
fn a_crash_in_a_middle_stage_reruns_the_item_and_init_and_finish_run_per_worker() {
    let guard = serial();
    let dir = std::env::temp_dir().join(format!("shmexec-pipeline-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native() + 1)
            .map("crashy", CrashOnce { dir: dir.clone() })
            .flat_map("twice", |&n| [n.to_native(), n.to_native()])
            .build(builder(&guard).workers(2))
            .unwrap();
        let got: Vec<u64> = p.run(0..40u64).map(|r| r.unwrap().to_native()).collect();
        let want: Vec<u64> = (0..40u64).flat_map(|n| [(n + 1) * 3; 2]).collect();
        assert_eq!(got, want);
        assert_eq!(p.group_stats()[0].respawns, 1);
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // Two workers and one successor started; the two live at the end finished.
    assert_eq!(names.iter().filter(|n| n.starts_with("init-")).count(), 3);
    assert_eq!(names.iter().filter(|n| n.starts_with("finish-")).count(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_sink_stage_gives_only_errors_and_records_pass_through_a_filter() {
    let guard = serial();
    {
        let mut p = Pipeline::<Vec<f32>>::builder()
            .filter("nonempty", |c| !c.is_empty())
            .each("check", |c| {
                if c.samples().iter().all(|&x| x >= 0.0) {
                    Ok(())
                } else {
                    Err("negative sample".into())
                }
            })
            .build(builder(&guard).workers(2))
            .unwrap();
        let chunks: Vec<Vec<f32>> = (0..30)
            .map(|i| match i % 3 {
                0 => vec![],
                1 => vec![1.0; 100],
                _ => vec![-1.0; 100],
            })
            .collect();
        let errors: Vec<Error> = p.run(&chunks).map(|r| r.unwrap_err()).collect();
        assert_eq!(errors.len(), 10);
        for (k, e) in errors.iter().enumerate() {
            assert_eq!(e.seq(), Some(3 * k as u64 + 2), "{e}");
            assert!(
                matches!(e, Error::Stage { stage, .. } if stage == "check"),
                "{e}"
            );
        }
        let stats = p.stats();
        assert_eq!(stats.stages[0].items, 30);
        assert_eq!(stats.stages[1].items, 20);
        assert_eq!(stats.stages[1].outputs, 0);
    }
    assert_no_children();
}

/// Writes one output bigger than the 1 MiB rings of the test pools.
struct TooBig;

impl Task for TooBig {
    type Input = u64;
    type Output = Vec<u8>;
    fn process(&mut self, _: &rkyv::Archived<u64>) -> Result<Vec<u8>, BoxError> {
        Ok(vec![0; 2 << 20])
    }
    fn produce(
        &mut self,
        n: &rkyv::Archived<u64>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        if n.to_native() % 2 == 0 {
            out.emit_last(&vec![1u8; 10])
        } else {
            out.emit_last(&self.process(n)?)
        }
    }
}

#[test]
fn settings_are_checked_and_an_output_too_large_names_its_stage() {
    let guard = serial();
    let empty = Pipeline::<u64>::builder().build(builder(&guard));
    assert!(matches!(empty, Err(Error::InvalidArgument(_))));
    let twice = Pipeline::<u64>::builder()
        .map_fn("a", |&n| n.to_native())
        .map_fn("a", |&n| n.to_native())
        .build(builder(&guard));
    assert!(matches!(twice, Err(Error::InvalidArgument(m)) if m.contains("'a'")));
    let spawn = Pipeline::<u64>::builder()
        .map_fn("a", |&n| n.to_native())
        .build(builder(&guard).spawn("x"));
    assert!(matches!(spawn, Err(Error::InvalidArgument(m)) if m.contains("fork")));
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native())
            .map("big", TooBig)
            .build(builder(&guard).workers(1))
            .unwrap();
        let results: Vec<_> = p.run(0..4u64).collect();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(v) => assert!(i % 2 == 0 && v.len() == 10),
                Err(Error::Stage { stage, error }) => {
                    assert_eq!(stage, "big");
                    assert!(matches!(*error, Error::OutputTooLarge { .. }), "{error}");
                    assert_eq!(i % 2, 1);
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_no_children();
}

/// Numbers the items it sees: the output is (input, how many items this worker saw before).
fn numbering() -> impl Task<Input = u64, Output = (u64, u64)> {
    let mut count = 0u64;
    shmexec::from_fn::<u64, _, _>(move |&n| {
        count += 1;
        (n.to_native(), count - 1)
    })
}

#[test]
fn groups_hand_items_on_by_hop_in_order_with_no_copy() {
    let guard = serial();
    {
        let mut p = Pipeline::<Vec<f32>>::builder()
            .map_fn("sum", |c| {
                c.samples().iter().map(|&x| x as u64).sum::<u64>()
            })
            .filter("even", |n| n.to_native() % 2 == 0)
            .map("number", numbering())
            .serial()
            .map_fn("pack", |pair| vec![pair.0.to_native(), pair.1.to_native()])
            .workers(2)
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(
            p.plan().fused(),
            vec![vec!["sum", "even"], vec!["number"], vec!["pack"]]
        );
        assert_eq!(p.plan().workers(), vec![2, 1, 2]);
        let plan = p.plan().to_string();
        assert!(plan.contains("number: serial, 1 worker"), "{plan}");
        let chunks: Vec<Vec<f32>> = (0..300u64).map(|i| vec![i as f32; 1000]).collect();
        let mut run = p.run(&chunks);
        let mut got: Vec<(u64, Vec<u64>)> = Vec::new();
        while let Some(r) = run.next() {
            let r = r.unwrap();
            got.push((r.seq(), r.iter().map(|x| x.to_native()).collect()));
            // Readable while the run goes on: every result handed out was counted before.
            let now = run.stats();
            assert!(now.stages[3].outputs >= got.len() as u64, "{now}");
            assert!(now.stages[0].items >= now.stages[2].items, "{now}");
        }
        drop(run);
        let evens: Vec<u64> = (0..300u64).filter(|i| (i * 1000) % 2 == 0).collect();
        assert_eq!(got.len(), evens.len());
        for (k, ((seq, pair), &i)) in got.iter().zip(&evens).enumerate() {
            // Numbered in input order, without gaps, by the one serial worker; the result
            // carries the number of the input it came from.
            assert_eq!(*seq, i);
            assert_eq!(pair, &vec![i * 1000, k as u64]);
        }
        let stats = p.stats();
        assert_eq!(stats.copied_between_groups, 0);
        assert_eq!(stats.stages[2].items, evens.len() as u64);
        assert_eq!(stats.stages[2].workers, 1);
        // The coordinator moved hops, not the chunks' sums, into the later groups.
        let groups = p.group_stats();
        assert_eq!(groups[1].input_bytes, 32 * evens.len() as u64);
        assert_eq!(groups[1].input_bytes_copied, 0);
    }
    assert_no_children();
}

#[test]
fn errors_travel_through_later_groups_in_their_place() {
    let guard = serial();
    {
        let mut p = Pipeline::<u64>::builder()
            .map(
                "first",
                shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                    n if n % 7 == 3 => Err(format!("{n} fails first").into()),
                    n => Ok(n),
                }),
            )
            .map(
                "second",
                shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                    n if n % 7 == 5 => Err(format!("{n} fails second").into()),
                    n => Ok(n * 2),
                }),
            )
            .alone()
            .map_fn("third", |&n| n.to_native() + 1)
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.plan().fused().len(), 3);
        for (i, r) in p.run(0..200u64).enumerate() {
            let i = i as u64;
            match (i % 7, r) {
                (3, Err(Error::Stage { stage, error })) => {
                    assert_eq!(stage, "first");
                    assert_eq!(error.seq(), Some(i));
                }
                (5, Err(Error::Stage { stage, error })) => {
                    assert_eq!(stage, "second");
                    assert_eq!(error.seq(), Some(i), "{error}");
                }
                (_, Ok(v)) => {
                    assert_eq!(v.seq(), i);
                    assert_eq!(v.to_native(), i * 2 + 1);
                }
                (_, other) => panic!("item {i}: {other:?}"),
            }
        }
    }
    assert_no_children();
}

#[test]
fn a_crash_in_a_later_group_reads_the_held_frame_again() {
    let guard = serial();
    let dir =
        std::env::temp_dir().join(format!("shmexec-pipeline-hop-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("first", |&n| n.to_native() + 1)
            .map("crashy", CrashOnce { dir: dir.clone() })
            .workers(1)
            .map_fn("last", |&n| n.to_native() * 10)
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.plan().workers(), vec![2, 1, 2]);
        let got: Vec<u64> = p.run(0..60u64).map(|r| r.unwrap().to_native()).collect();
        let want: Vec<u64> = (0..60u64).map(|n| (n + 1) * 3 * 10).collect();
        assert_eq!(got, want);
        let respawns: Vec<u64> = p.group_stats().iter().map(|s| s.respawns).collect();
        assert_eq!(respawns, vec![0, 1, 0]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// Numbers events on from the chunk before: chunk `i` has `i % 5` events. It kills its worker
/// the first time it sees chunk 7 (half way through: after numbering, before returning), and
/// fails chunk 11.
struct NumberEvents {
    dir: PathBuf,
}

impl shmexec::pipeline::Stateful for NumberEvents {
    type Input = u64;
    type Output = Vec<u64>;
    type State = u64;
    fn process(
        &mut self,
        next: &mut u64,
        chunk: &rkyv::Archived<u64>,
    ) -> Result<Vec<u64>, BoxError> {
        let i = chunk.to_native();
        let numbers: Vec<u64> = (*next..*next + i % 5).collect();
        *next += i % 5;
        let marker = self.dir.join("crashed");
        if i == 7 && !marker.exists() {
            std::fs::write(&marker, b"")?;
            std::process::abort();
        }
        if i == 11 {
            return Err("chunk 11 is bad".into());
        }
        Ok(numbers)
    }
}

#[test]
fn a_stateful_stage_numbers_without_gaps_through_a_crash_and_a_failed_chunk() {
    let guard = serial();
    let dir = std::env::temp_dir().join(format!("shmexec-pipeline-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&n| n.to_native())
            .stateful("number", NumberEvents { dir: dir.clone() })
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.plan().workers(), vec![2, 1]);
        let mut numbers = Vec::new();
        for (i, r) in p.run(0..30u64).enumerate() {
            match r {
                Ok(v) => numbers.extend(v.iter().map(|x| x.to_native())),
                Err(e) => {
                    assert_eq!(i, 11, "{e}");
                    assert!(
                        matches!(&e, Error::Stage { stage, .. } if stage == "number"),
                        "{e}"
                    );
                }
            }
        }
        // Every event of every chunk but 11 numbered once, in order, with no gap.
        let want = (0..30u64).filter(|&i| i != 11).map(|i| i % 5).sum::<u64>();
        assert_eq!(numbers, (0..want).collect::<Vec<_>>());
        assert_eq!(p.group_stats()[1].respawns, 1);
        // The next run starts from the default state again: numbered from 0.
        let more: Vec<u64> = p
            .run([3u64, 4])
            .flat_map(|r| r.unwrap().iter().map(|x| x.to_native()).collect::<Vec<_>>())
            .collect();
        assert_eq!(more, (0..7).collect::<Vec<u64>>());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

/// A three-stage pipeline whose middle stage is saved in `store`; `records` counts its runs in
/// the stats. Chunk 13 fails in `events` if `fail` (after `peaks`, so the stream is complete).
fn cached(
    guard: &std::sync::MutexGuard<'static, ()>,
    store: &shmexec::store::Store,
    peaks_config: &[u8],
    last_saved: bool,
) -> Pipeline<u64, u64> {
    let stages = Pipeline::<u64>::builder()
        .map_fn("records", |&n| n.to_native() * 2)
        .map_fn("peaks", |&n| vec![n.to_native(); 3])
        .config(peaks_config)
        .save(store)
        .map_fn("events", |v: &rkyv::Archived<Vec<u64>>| {
            v.iter().map(|x| x.to_native()).sum::<u64>()
        });
    let stages = if last_saved {
        stages.save(store)
    } else {
        stages
    };
    stages.build(builder(guard).workers(2)).unwrap()
}

#[test]
fn a_saved_stage_is_served_from_its_store_the_second_time() {
    use shmexec::store::{StageKey, Store};
    let guard = serial();
    let dir = std::env::temp_dir().join(format!("shmexec-pipeline-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
    let run42 = StageKey::new("raw_records", "run 42", b"");
    let want: Vec<u64> = (0..50u64).map(|n| n * 6).collect();
    {
        let mut p = cached(&guard, &store, b"gain 1", false);
        assert_eq!(
            p.plan().fused(),
            vec![vec!["records", "peaks"], vec!["events"]]
        );
        // Miss: everything runs, peaks are saved.
        let mut run = p.run_keyed(&run42, 0..50u64).unwrap();
        assert!(run.cache().is_none());
        let got: Vec<u64> = run.by_ref().map(|r| r.unwrap().to_native()).collect();
        assert_eq!(got, want);
        assert_eq!(run.saved(), ["peaks"]);
        drop(run);
        let before = p.stats();
        // Hit: records and peaks do not run, and the inputs are not even looked at.
        let mut run = p.run_keyed(&run42, std::iter::empty::<u64>()).unwrap();
        let hit = run.cache().cloned().unwrap();
        assert_eq!((hit.stage.as_str(), hit.chunks), ("peaks", 50));
        let got: Vec<(u64, u64)> = run
            .by_ref()
            .map(|r| {
                let r = r.unwrap();
                (r.seq(), r.to_native())
            })
            .collect();
        assert_eq!(
            got,
            want.iter()
                .enumerate()
                .map(|(i, &v)| (i as u64, v))
                .collect::<Vec<_>>()
        );
        assert!(run.saved().is_empty());
        drop(run);
        let used = p.stats().since(&before);
        assert_eq!(used.stages[0].items, 0);
        assert_eq!(used.stages[1].items, 0);
        assert_eq!(used.stages[2].items, 50);
        // Another source is another key: computed again.
        let run43 = StageKey::new("raw_records", "run 43", b"");
        let run = p.run_keyed(&run43, 0..5u64).unwrap();
        assert!(run.cache().is_none());
        assert_eq!(run.count(), 5);
    }
    {
        // Another configuration of peaks is another key: a miss, saved beside the first.
        let mut p = cached(&guard, &store, b"gain 2", false);
        let run = p.run_keyed(&run42, 0..50u64).unwrap();
        assert!(run.cache().is_none());
        assert_eq!(run.count(), 50);
        // The last stage saved too: a hit hands out the saved chunks themselves.
        let mut p = cached(&guard, &store, b"gain 1", true);
        let mut run = p.run_keyed(&run42, 0..50u64).unwrap();
        assert_eq!(run.cache().unwrap().stage, "peaks");
        assert_eq!(run.by_ref().count(), 50);
        assert_eq!(run.saved(), ["events"]);
        drop(run);
        let run = p.run_keyed(&run42, std::iter::empty::<u64>()).unwrap();
        assert_eq!(run.cache().unwrap().stage, "events");
        let got: Vec<u64> = run.map(|r| r.unwrap().to_native()).collect();
        assert_eq!(got, want);
    }
    assert_eq!(store.streams().unwrap().len(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_run_that_fails_an_item_or_stops_early_saves_nothing_and_a_torn_chunk_is_named() {
    use shmexec::store::{StageKey, Store};
    let guard = serial();
    let dir = std::env::temp_dir().join(format!("shmexec-pipeline-torn-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
    let key = StageKey::new("raw_records", "run 7", b"");
    {
        let mut p = Pipeline::<u64>::builder()
            .map(
                "peaks",
                shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                    13 => Err("bad chunk".into()),
                    n => Ok(n),
                }),
            )
            .save(&store)
            .map_fn("events", |&n| n.to_native())
            .build(builder(&guard).workers(2))
            .unwrap();
        let mut run = p.run_keyed(&key, 0..20u64).unwrap();
        assert_eq!(run.by_ref().filter(|r| r.is_err()).count(), 1);
        assert!(run.saved().is_empty());
        drop(run);
        // Stopped early: nothing saved either.
        let mut run = p.run_keyed(&key, 20..40u64).unwrap();
        assert!(run.next().unwrap().is_ok());
        drop(run);
        assert!(store.streams().unwrap().is_empty());
        // A complete run saves; then a chunk file is cut short.
        let mut run = p.run_keyed(&key, 20..40u64).unwrap();
        assert_eq!(run.by_ref().filter(|r| r.is_ok()).count(), 20);
        assert_eq!(run.saved(), ["peaks"]);
        drop(run);
        let stream = store.streams().unwrap().pop().unwrap();
        let torn = stream.chunk(4).unwrap().path().to_owned();
        drop(stream);
        let len = std::fs::metadata(&torn).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&torn)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let results: Vec<_> = p.run_keyed(&key, 0..0u64).unwrap().collect();
        assert_eq!(results.len(), 20);
        for (i, r) in results.iter().enumerate() {
            match r {
                Err(e) if i == 4 => {
                    let msg = e.to_string();
                    assert!(msg.contains(&torn.display().to_string()), "{msg}");
                }
                Ok(v) => assert_eq!(v.to_native(), 20 + i as u64),
                Err(e) => panic!("chunk {i}: {e}"),
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_successor_whose_first_item_is_filtered_before_the_stateful_stage_keeps_the_state() {
    let guard = serial();
    let dir = std::env::temp_dir().join(format!(
        "shmexec-pipeline-state-filter-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    {
        let marker = dir.join("crash-stage");
        // One serial worker runs all three stages; it dies on item 9 the first time, and item
        // 9 is one the filter drops: the successor's first item never reaches `number`. (It
        // dies on item 7 too, in `number`.)
        let mut p = Pipeline::<u64>::builder()
            .map_fn("crash", move |&n| {
                let n = n.to_native();
                if n == 9 && !marker.exists() {
                    std::fs::write(&marker, b"").unwrap();
                    std::process::abort();
                }
                n
            })
            .serial()
            .filter("not_threes", |n| n.to_native() % 3 != 0)
            .serial()
            .stateful("number", NumberEvents { dir: dir.clone() })
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.plan().fused().len(), 1);
        let numbers: Vec<u64> = p
            .run(0..30u64)
            .filter_map(|r| r.ok())
            .flat_map(|r| r.iter().map(|x| x.to_native()).collect::<Vec<_>>())
            .collect();
        let want = (0..30u64)
            .filter(|&i| i % 3 != 0 && i != 11)
            .map(|i| i % 5)
            .sum::<u64>();
        assert_eq!(numbers, (0..want).collect::<Vec<_>>());
        assert_eq!(p.group_stats()[0].respawns, 2);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_branch_reads_the_same_frames_and_the_slowest_consumer_sets_the_pace() {
    use shmexec::store::{StageKey, Store};
    let guard = serial();
    let dir = std::env::temp_dir().join(format!("shmexec-pipeline-branch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
    {
        // 64 KiB rings: the slow branch holds frames of `peaks` that the main line is done
        // with, so `peaks` must wait for it (nothing is dropped, nothing overruns).
        let mut p = Pipeline::<u64>::builder()
            .map(
                "peaks",
                shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                    17 => Err("17 fails before the fan-out".into()),
                    n => Ok(vec![n; 1000]),
                }),
            )
            .branch(|peaks| {
                peaks
                    .map_fn("slow", |v: &rkyv::Archived<Vec<u64>>| {
                        std::thread::sleep(std::time::Duration::from_micros(300));
                        v[0].to_native()
                    })
                    .workers(1)
                    .map(
                        "saved",
                        shmexec::try_from_fn::<u64, _, _>(|&n| match n.to_native() {
                            33 => Err("33 fails in the branch".into()),
                            n => Ok(n * 2),
                        }),
                    )
                    .workers(1)
                    .save(&store)
            })
            .map_fn("sum", |v: &rkyv::Archived<Vec<u64>>| {
                v.iter().map(|x| x.to_native()).sum::<u64>()
            })
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        assert_eq!(
            p.plan().fused(),
            vec![vec!["peaks"], vec!["sum"], vec!["slow", "saved"]]
        );
        let plan = p.plan().to_string();
        assert!(
            plan.contains("slow + saved: fused, 1 worker, a branch reading peaks"),
            "{plan}"
        );
        let key = StageKey::new("raw", "branch test", b"");
        let mut run = p.run_keyed(&key, 0..200u64).unwrap();
        let mut main = Vec::new();
        for r in run.by_ref() {
            match r {
                Ok(v) => main.push((v.seq(), v.to_native())),
                Err(e) => assert_eq!(e.seq(), Some(17), "{e}"),
            }
        }
        let want: Vec<(u64, u64)> = (0..200u64)
            .filter(|&n| n != 17)
            .map(|n| (n, n * 1000))
            .collect();
        assert_eq!(main, want);
        // The branch saw every item: 17's error reached it too, and 33 failed there.
        assert_eq!(run.branch_failures(), 2);
        let seqs: Vec<Option<u64>> = run.branch_errors().iter().map(|e| e.seq()).collect();
        assert_eq!(seqs, vec![Some(17), Some(33)]);
        assert!(
            matches!(&run.branch_errors()[1], Error::Stage { stage, .. } if stage == "saved"),
            "{:?}",
            run.branch_errors()
        );
        // A branch item failed: its stream is not complete, so it is not saved.
        assert!(run.saved().is_empty());
        drop(run);
        let stats = p.stats();
        assert_eq!(stats.stages[1].items, 199); // sum
        assert_eq!(stats.stages[2].items, 199); // slow
        assert_eq!(stats.copied_between_groups, 0);
        // With nothing failing, the branch's saved stage is committed, every output in order.
        let other = StageKey::new("raw", "branch test, no failures", b"");
        let mut run = p.run_keyed(&other, 0..10u64).unwrap();
        assert_eq!(run.by_ref().count(), 10);
        assert_eq!(run.saved(), ["saved"]);
        drop(run);
        let saved = store.load(&p.keys(&other)[3]).unwrap().unwrap();
        let values: Vec<u64> = (0..saved.chunks())
            .map(|i| {
                saved
                    .chunk(i)
                    .unwrap()
                    .archive::<u64>()
                    .unwrap()
                    .to_native()
            })
            .collect();
        assert_eq!(values, (0..10u64).map(|n| n * 2).collect::<Vec<_>>());
        assert_eq!(saved.history().len(), 4, "{:?}", saved.history());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_no_children();
}

#[test]
fn a_live_source_on_another_thread_feeds_a_run_in_order_and_either_half_can_go_first() {
    let guard = serial();
    {
        let mut p = Pipeline::<Vec<u64>>::builder()
            .map_fn("sum", |c| c.iter().map(|x| x.to_native()).sum::<u64>())
            .map_fn("double", |&n| n.to_native() * 2)
            .workers(1)
            .build(builder(&guard).workers(2))
            .unwrap();
        let got = std::thread::scope(|s| {
            let (tx, run) = p.stream();
            s.spawn(move || {
                for i in 0..500u64 {
                    tx.send(vec![i; 1000]).unwrap();
                }
            });
            run.map(|r| {
                let r = r.unwrap();
                (r.seq(), r.to_native())
            })
            .collect::<Vec<_>>()
        });
        assert_eq!(got, (0..500u64).map(|i| (i, i * 2000)).collect::<Vec<_>>());
        // The run goes first: a sender waiting for room (or sending later) gets an error,
        // and the pipeline runs again.
        let (tx, mut run) = p.stream();
        tx.send(vec![1; 10]).unwrap();
        assert_eq!(run.next().unwrap().unwrap().to_native(), 20);
        drop(run);
        assert!(matches!(tx.send(vec![2; 10]), Err(Error::StreamClosed)));
        assert!(matches!(
            tx.send_timeout(vec![3; 10], std::time::Duration::from_millis(5)),
            Err(Error::StreamClosed)
        ));
        drop(tx);
        let again: Vec<u64> = p
            .run([vec![5u64; 4]])
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(again, vec![40]);
        // A sender with nothing to send: the run waits, then ends when it is dropped.
        let (tx, run) = p.stream();
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                drop(tx);
            });
            assert_eq!(run.count(), 0);
        });
    }
    assert_no_children();
}

#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Hit {
    time: i64,
    area: f32,
    channel: u32,
}

#[test]
fn records_and_samples_go_in_from_slices_and_in_place() {
    let guard = serial();
    {
        let mut p = Pipeline::<shmexec::Records<Hit>>::builder()
            .map_fn("area", |r| {
                r.records().iter().map(|h| h.area as f64).sum::<f64>()
            })
            .map_fn("times2", |&a| a.to_native() * 2.0)
            .workers(1)
            .build(builder(&guard).workers(2))
            .unwrap();
        let hits: Vec<Hit> = (0..1000)
            .map(|i| Hit {
                time: i,
                area: (i % 10) as f32,
                channel: 0,
            })
            .collect();
        let got: Vec<f64> = p
            .run_record_slices(hits.chunks(100))
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, vec![900.0; 10]);
        let got: Vec<f64> = p
            .run_records_in_place([3usize, 0, 5], |i, out: &mut [Hit]| {
                for (k, h) in out.iter_mut().enumerate() {
                    *h = Hit {
                        time: k as i64,
                        area: i as f32 + 1.0,
                        channel: 1,
                    };
                }
                Ok(())
            })
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, vec![6.0, 0.0, 30.0]);
        let mut q = Pipeline::<Vec<f32>>::builder()
            .map_fn("sum", |c| c.samples().iter().sum::<f32>())
            .build(builder(&guard).workers(2))
            .unwrap();
        let got: Vec<f32> = q
            .run_in_place([4usize, 2], |i, out: &mut [f32]| {
                out.fill(i as f32 + 0.5);
                Ok(())
            })
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, vec![2.0, 3.0]);
        let data = vec![1.0f32; 64];
        let got: Vec<f32> = q
            .run_slices(data.chunks(16))
            .map(|r| r.unwrap().to_native())
            .collect();
        assert_eq!(got, vec![16.0; 4]);
    }
    assert_no_children();
}

impl shmexec::time::Interval for Hit {
    fn start(&self) -> i64 {
        self.time
    }
    fn end(&self) -> i64 {
        self.time + 1
    }
}

#[test]
fn chunks_that_break_the_time_laws_are_errors_naming_the_stage_and_the_chunk() {
    use shmexec::time::TimeRange;
    let guard = serial();
    {
        // Chunk i covers [100 i, 100 i + 100) with a hit at each 10 ns; chunk 5 leaves a gap
        // before it, chunk 9 has two hits swapped, chunk 12 a hit past its end.
        let mut p = Pipeline::<u64>::builder()
            .map_fn("chunks", |&i| {
                let i = i.to_native() as i64;
                let start = if i == 5 { 100 * i + 10 } else { 100 * i };
                let mut hits: Vec<Hit> = (start / 10..(100 * i + 100) / 10)
                    .map(|t| Hit {
                        time: t * 10,
                        area: 1.0,
                        channel: 0,
                    })
                    .collect();
                if i == 9 {
                    hits.swap(2, 3);
                }
                if i == 12 {
                    hits.last_mut().unwrap().time = 100 * i + 100;
                }
                (
                    shmexec::Records(hits),
                    TimeRange::new(start, 100 * i + 100).unwrap(),
                )
            })
            .check_time()
            .map_fn("count", |c| c.0.records().len() as u64)
            .build(builder(&guard).workers(2))
            .unwrap();
        assert_eq!(p.plan().fused().len(), 2);
        for (i, r) in p.run(0..20u64).enumerate() {
            match (i, r) {
                (5 | 9 | 12, Err(Error::Stage { stage, error })) => {
                    assert_eq!(stage, "chunks");
                    let Error::Time { seq, error } = *error else {
                        panic!("chunk {i}: {error}");
                    };
                    assert_eq!(seq, i as u64);
                    let msg = error.to_string();
                    assert!(msg.contains("chunks chunk"), "{msg}");
                }
                (5 | 9 | 12, other) => panic!("chunk {i}: {other:?}"),
                (_, r) => assert_eq!(r.unwrap().to_native(), 10),
            }
        }
        // The next run starts the stream again: its first chunk may start anywhere.
        let n = p.run(40..45u64).filter(|r| r.is_ok()).count();
        assert_eq!(n, 5);
    }
    assert_no_children();
}

#[test]
fn an_unordered_run_hands_out_every_result_once_numbered_by_its_input() {
    let guard = serial();
    {
        let mut p = Pipeline::<u64>::builder()
            .flat_map("two", |&n| [n.to_native(), n.to_native() + 1000])
            .map(
                "slow_on_3",
                shmexec::try_from_fn::<u64, _, _>(|&n| {
                    let n = n.to_native();
                    if n == 3 {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    if n == 7 {
                        return Err("7 fails".into());
                    }
                    Ok(n * 10)
                }),
            )
            .workers(2)
            .build(builder(&guard).workers(2))
            .unwrap();
        for _ in 0..3 {
            let mut got: Vec<(u64, u64)> = Vec::new();
            let mut errors = Vec::new();
            let base = p.run(std::iter::empty::<u64>()).count(); // numbering goes on across runs
            assert_eq!(base, 0);
            for r in p.run_unordered(0..40u64) {
                match r {
                    Ok(v) => got.push((v.seq() % 40, v.to_native())),
                    Err(e) => errors.push(e.seq().map(|s| s % 40)),
                }
            }
            // Input 7 failed once; its other output is handed out only if it came before the
            // error (in an unordered run, which comes first is the workers' race).
            assert_eq!(errors, vec![Some(7)]);
            got.retain(|&(n, v)| n != 7 || v != 10070);
            got.sort_unstable();
            let mut want: Vec<(u64, u64)> = (0..40u64)
                .filter(|&n| n != 7)
                .flat_map(|n| [(n, n * 10), (n, (n + 1000) * 10)])
                .collect();
            want.sort_unstable();
            assert_eq!(got, want);
        }
    }
    assert_no_children();
}

#[test]
fn dropping_a_pipeline_with_full_rings_and_held_frames_stops_at_once() {
    let guard = serial();
    // Far longer than a drop takes: a drop that waits for the shutdown timeout is caught.
    let _dog = support::watchdog(40, "dropping_a_pipeline_with_full_rings_and_held_frames");
    {
        let mut p = Pipeline::<u64>::builder()
            .map_fn("big", |&n| vec![n.to_native(); 2000])
            .map_fn("slow", |v: &rkyv::Archived<Vec<u64>>| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                v[0].to_native()
            })
            .workers(1)
            .build(
                builder(&guard)
                    .workers(2)
                    .ring_bytes(1 << 16)
                    .shutdown_timeout(std::time::Duration::from_secs(60)),
            )
            .unwrap();
        let mut run = p.run(0..10_000u64);
        assert_eq!(run.next().unwrap().unwrap().to_native(), 0);
        // The first group's output rings fill with frames the slow group holds.
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(run);
    }
    assert_no_children();
}

#[test]
fn a_branch_off_the_last_stage_is_refused_and_a_checked_last_stage_stays_in_order() {
    use shmexec::time::TimeRange;
    let guard = serial();
    let tail = Pipeline::<u64>::builder()
        .map_fn("a", |&n| n.to_native())
        .branch(|b| b.each("sink", |_| Ok(())))
        .build(builder(&guard));
    assert!(matches!(tail, Err(Error::InvalidArgument(m)) if m.contains("branch")));
    {
        // Unordered, but the time laws are checked in order: no false gap.
        let mut p = Pipeline::<u64>::builder()
            .map(
                "chunks",
                shmexec::try_from_fn::<u64, _, _>(|&i| {
                    let i = i.to_native() as i64;
                    if i == 4 {
                        return Err("chunk 4 fails".into());
                    }
                    if i % 3 == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    let hits = vec![Hit {
                        time: 100 * i,
                        area: 1.0,
                        channel: 0,
                    }];
                    Ok((
                        shmexec::Records(hits),
                        TimeRange::new(100 * i, 100 * i + 100).unwrap(),
                    ))
                }),
            )
            .check_time()
            .build(builder(&guard).workers(2))
            .unwrap();
        let results: Vec<_> = p.run_unordered(0..30u64).collect();
        let errors: Vec<Option<u64>> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.seq())
            .collect();
        // Chunk 4 failed; the chunk after it is not taken for a gap.
        assert_eq!(errors, vec![Some(4)], "{results:?}");
        assert_eq!(results.len(), 30);
    }
    assert_no_children();
}

/// Peak chunk `k` of input `i`: five values.
fn join_peaks(i: u64) -> Vec<Vec<u64>> {
    let n = [0, 1, 3][(i % 3) as usize];
    (0..n)
        .map(|k| (0..5).map(|j| i * 100 + k * 10 + j).collect())
        .collect()
}

/// Two events per peak chunk: its first three values and its last two.
fn join_events(peaks: &[u64]) -> Vec<(u64, u64)> {
    vec![(peaks[0], peaks[2]), (peaks[3], peaks[4])]
}

/// Each event with the count and sum of its input's peak values inside it, and how many peak
/// chunks the join saw.
struct EventBasics;

impl shmexec::pipeline::Join for EventBasics {
    type Base = (u64, u64);
    type Side = Vec<u64>;
    type Output = (u64, u64, u64, u64, u64);
    fn process(
        &mut self,
        event: &rkyv::Archived<(u64, u64)>,
        peaks: &[&rkyv::Archived<Vec<u64>>],
    ) -> Result<(u64, u64, u64, u64, u64), BoxError> {
        let (start, end) = (event.0.to_native(), event.1.to_native());
        let inside: Vec<u64> = peaks
            .iter()
            .flat_map(|p| p.iter().map(|v| v.to_native()))
            .filter(|&v| start <= v && v <= end)
            .collect();
        let sum = inside.iter().sum();
        Ok((start, end, inside.len() as u64, sum, peaks.len() as u64))
    }
}

/// The sequential reference of the join pipeline, for input `i`.
fn join_reference(i: u64) -> Vec<(u64, u64, u64, u64, u64)> {
    let peaks = join_peaks(i);
    let mut out = Vec::new();
    for p in &peaks {
        for (start, end) in join_events(p) {
            let inside: Vec<u64> = peaks
                .iter()
                .flatten()
                .copied()
                .filter(|&v| start <= v && v <= end)
                .collect();
            let sum = inside.iter().sum();
            out.push((start, end, inside.len() as u64, sum, peaks.len() as u64));
        }
    }
    out
}

fn join_pipeline(
    guard: &std::sync::MutexGuard<'static, ()>,
) -> Pipeline<u64, (u64, u64, u64, u64, u64)> {
    Pipeline::<u64>::builder()
        .flat_map("peaks", |&i| join_peaks(i.to_native()))
        .flat_map("events", |p| {
            join_events(&p.iter().map(|v| v.to_native()).collect::<Vec<u64>>())
        })
        .join("event_basics", "peaks", EventBasics)
        .map_fn("copy", |e| {
            (
                e.0.to_native(),
                e.1.to_native(),
                e.2.to_native(),
                e.3.to_native(),
                e.4.to_native(),
            )
        })
        .build(builder(guard).workers(2))
        .expect("pipeline")
}

#[test]
fn a_join_reads_every_side_output_of_the_same_input() {
    let guard = serial();
    let _watchdog = support::watchdog(120, "join");
    {
        let mut p = join_pipeline(&guard);
        assert_eq!(
            p.plan().fused(),
            vec![vec!["peaks"], vec!["events"], vec!["event_basics", "copy"]]
        );
        for round in 0..2u64 {
            let inputs = round * 300..(round + 1) * 300;
            let got: Vec<_> = p
                .run(inputs.clone())
                .map(|r| {
                    let r = r.unwrap();
                    (
                        r.0.to_native(),
                        r.1.to_native(),
                        r.2.to_native(),
                        r.3.to_native(),
                        r.4.to_native(),
                    )
                })
                .collect();
            let want: Vec<_> = inputs.flat_map(join_reference).collect();
            assert_eq!(got.len(), want.len());
            assert_eq!(got, want);
        }
        let stats = p.stats();
        assert_eq!(stats.stages[2].items, stats.stages[1].outputs);
        // The join's key is built on its base's key, then its side's.
        let keys = p.keys(&shmexec::store::StageKey::new("raw", "1", b""));
        let inputs: Vec<&str> = keys[2].inputs().map(|k| k.name()).collect();
        assert_eq!(inputs, vec!["events", "peaks"]);
    }
    assert_no_children();
}

/// Keeps one chunk in fifty: the side frames of the others must be let go, or the side's
/// 64 KiB rings fill and the run hangs.
#[test]
fn side_frames_of_inputs_the_base_drops_are_let_go() {
    let guard = serial();
    let _watchdog = support::watchdog(120, "join filter");
    {
        struct Sum;
        impl shmexec::pipeline::Join for Sum {
            type Base = Vec<u64>;
            type Side = Vec<u64>;
            type Output = (u64, u64);
            fn process(
                &mut self,
                base: &rkyv::Archived<Vec<u64>>,
                side: &[&rkyv::Archived<Vec<u64>>],
            ) -> Result<(u64, u64), BoxError> {
                let sum =
                    |v: &rkyv::Archived<Vec<u64>>| v.iter().map(|x| x.to_native()).sum::<u64>();
                Ok((sum(base), side.iter().map(|s| sum(s)).sum()))
            }
        }
        let mut p = Pipeline::<u64>::builder()
            .map_fn("peaks", |&i| vec![i.to_native(); 1000])
            .filter("some", |p| p[0].to_native() % 50 == 7)
            .join("basics", "peaks", Sum)
            .build(builder(&guard).workers(2).ring_bytes(1 << 16))
            .unwrap();
        let got: Vec<u64> = p.run(0..2000u64).map(|r| r.unwrap().seq()).collect();
        let want: Vec<u64> = (0..2000u64).filter(|i| i % 50 == 7).collect();
        assert_eq!(got, want);
        // A second run numbers its inputs on from the first.
        for r in p.run(0..200u64) {
            let r = r.unwrap();
            let i = r.seq() - 2000;
            assert_eq!((r.0.to_native(), r.1.to_native()), (i * 1000, i * 1000));
        }
    }
    assert_no_children();
}

#[test]
fn a_killed_join_worker_gives_every_result_exactly_once() {
    let guard = serial();
    let _watchdog = support::watchdog(120, "join kill");
    {
        let mut p = join_pipeline(&guard);
        for round in 0..3u64 {
            let stats = p.group_stats();
            let pid = stats[2].workers[round as usize % stats[2].workers.len()].pid;
            let inputs = round * 200..(round + 1) * 200;
            let mut got = Vec::new();
            for (k, r) in p.run(inputs.clone()).enumerate() {
                if k == 20 {
                    support::kill(pid);
                }
                let r = r.unwrap();
                got.push((
                    r.0.to_native(),
                    r.1.to_native(),
                    r.2.to_native(),
                    r.3.to_native(),
                    r.4.to_native(),
                ));
            }
            let want: Vec<_> = inputs.flat_map(join_reference).collect();
            assert_eq!(got, want);
        }
        assert!(p.group_stats()[2].respawns >= 1);
    }
    assert_no_children();
}

#[test]
fn a_join_is_refused_with_an_unknown_or_later_side_or_another_type() {
    let guard = serial();
    let build = |p: shmexec::pipeline::Stages<u64, (u64, u64, u64, u64, u64)>| match p
        .build(builder(&guard).workers(1))
    {
        Err(Error::InvalidArgument(why)) => why,
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("built"),
    };
    let events = || {
        Pipeline::<u64>::builder()
            .flat_map("peaks", |&i| join_peaks(i.to_native()))
            .flat_map("events", |p| {
                join_events(&p.iter().map(|v| v.to_native()).collect::<Vec<u64>>())
            })
    };
    let why = build(events().join("basics", "hits", EventBasics));
    assert!(why.contains("no stage of that name"), "{why}");
    let why = build(
        events()
            .join("basics", "later", EventBasics)
            .map_fn("later", |_| vec![0u64])
            .map_fn("again", |_| (0u64, 0u64))
            .join("basics2", "peaks", EventBasics),
    );
    assert!(why.contains("comes after it"), "{why}");
    let why = build(
        Pipeline::<u64>::builder()
            .map_fn("peaks", |&i| vec![i.to_native() as u32])
            .map_fn("events", |_| (0u64, 0u64))
            .join("basics", "peaks", EventBasics),
    );
    assert!(why.contains("but that stage gives"), "{why}");
    let why = build(
        Pipeline::<u64>::builder()
            .map_fn("first", |&i| vec![i.to_native()])
            .map_fn("events", |_| (0u64, 0u64))
            .join("basics", "events", EventBasics),
    );
    assert!(why.contains("right before it"), "{why}");
}

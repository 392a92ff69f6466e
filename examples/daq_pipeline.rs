//! A strax-like DAQ chain on a [`Pipeline`]: raw records -> records -> peaks -> events ->
//! numbered events, over synthetic digitizer data, checked against a sequential reference.
//!
//! A digitizer gives chunks of `raw_records`: fixed-size fragments of 110 `i16` samples (10 ns
//! each) of the pulses its 32 channels recorded, each chunk covering a time range, the chunks
//! contiguous. Four stages turn them into events, as strax's plugins do:
//!
//! - `records`: subtracts each pulse's baseline (the mean of its first 40 samples), flips the
//!   negative-going pulses positive, integrates each record and finds its hits (runs of samples
//!   above 15 ADC counts). The records are written in place in the output slot; the hits go
//!   with them.
//! - `peaks`: clusters the hits of all channels into peaks (hits less than 700 ns apart join
//!   one), with their area, channels, largest channel and a 32-bin summed waveform. Saved: its
//!   outputs go to a store under a key made of the source's key (the synthetic run: seed and
//!   sizes) and the names, versions and settings of `records` and `peaks`; a later run with the
//!   same key reads them from there and runs neither stage.
//! - `events`: every peak above an area threshold opens a window around it; overlapping windows
//!   merge, and each window with the peaks fully inside it is an event.
//! - `numbering`: numbers the events 0, 1, 2... over the run, in chunk order: a stateful stage
//!   on one worker that sees every chunk in order, whose state (the next number) is saved after
//!   every chunk, so that a successor of a worker that died goes on from it.
//!
//! Every chunk travels as `(Records<T>, meta)`, the records read in place where they lie.
//! `records` and `peaks` run fused in each worker of the first group; `events` in a group of
//! its own (the saved stage ends its group), reading the peaks where they lie, in the first
//! group's rings or, when served from the store, in the mapped chunk files; `numbering` on its
//! one serial worker. The example runs the chain twice with its key (the first run computes
//! and saves `peaks`, the second is served from them), then times it, uncached, against one
//! task that calls the first three stages' functions by hand (with the numbering in the
//! coordinator), checking every result against a reference that runs the same functions in one
//! thread without shmexec, and prints per-stage throughput and the two throughputs side by
//! side. Each stage also digests what it received, so the check covers what crossed each stage
//! boundary, not only the events at the end.
//!
//! ```text
//! cargo run --release --example daq_pipeline -- [--chunks N] [--records-per-chunk M]
//!     [--workers W] [--store DIR]
//! ```
//!
//! Defaults: 64 chunks of about 10 000 raw records (2.5 MB each, 160 MB in all), as many
//! workers as cores, a fresh store in the temporary directory (removed at exit; `--store DIR`
//! keeps it, and a later invocation with the same settings is served from it from its first
//! run); a few seconds on a 2-core machine. It exits non-zero if any result differs from the
//! reference or the saved stage is not served as it should be.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use rkyv::{Archive, Archived, Deserialize, Serialize};
use shmexec::pipeline::{Pipeline, PipelineStats, StageStats, Stateful};
use shmexec::store::{StageKey, Store};
use shmexec::time::{Interval, TimeRange, check_chunk, split_by_containment};
use shmexec::{BoxError, DEFAULT_RING_BYTES, OutputRef, OutputSink, Pool, Records, Task};

/// Nanoseconds per sample.
const DT: i64 = 10;
const SAMPLES_PER_RECORD: usize = 110;
const CHANNELS: usize = 32;
/// Samples at the start of a pulse that give its baseline.
const BASELINE_SAMPLES: usize = 40;
/// ADC counts above baseline for a sample to be part of a hit.
const HIT_THRESHOLD: i16 = 15;
/// Hits closer than this (from the end of a peak so far to the next hit's start) join one peak.
const PEAK_GAP_NS: i64 = 700;
const WAVEFORM_BINS: usize = 32;
/// A peak of at least this area (ADC counts x samples) triggers an event.
const TRIGGER_AREA: f32 = 20_000.0;
/// An event covers `[trigger start - LEFT, trigger end + RIGHT)`.
const EVENT_LEFT_NS: i64 = 10_000;
const EVENT_RIGHT_NS: i64 = 5_000;

/// Digitizer: the run's first chunk starts here (ns since the epoch).
const RUN_START_NS: i64 = 1_700_000_000_000_000_000;
const NOMINAL_BASELINE: i16 = 16_000;
/// Samples a pulse holds before its first signal and after its last.
const PRE_TRIGGER: i64 = 50;
const POST_TRIGGER: i64 = 20;
/// No signal within this of a chunk's edges: nothing the stages build crosses a boundary.
const QUIET_NS: i64 = 40_000;
/// Chunk length per raw record asked for.
const NS_PER_RECORD: i64 = 1_000;
const SEED: u64 = 0x5EED_DA7A_2024_0001;

/// The settings of `records`, as the configuration in its key: a stream of peaks saved with
/// other settings (upstream of peaks, so in their key too) is not taken for this one's.
fn records_config() -> String {
    format!("baseline_samples={BASELINE_SAMPLES} hit_threshold={HIT_THRESHOLD}")
}

/// The settings of `peaks`, as the configuration in its key.
fn peaks_config() -> String {
    format!("peak_gap_ns={PEAK_GAP_NS} waveform_bins={WAVEFORM_BINS}")
}

/// A digitizer record: up to 110 samples of one channel's pulse, packed as strax packs it.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct RawRecord {
    time: i64,
    /// Samples used in `data`.
    length: i32,
    dt: i16,
    channel: i16,
    /// Samples in the whole pulse, of which this record is number `record_i`.
    pulse_length: i32,
    record_i: i16,
    /// The digitizer's nominal baseline (its DAC setting, not a measurement).
    baseline: i16,
    _pad: u32,
    data: [i16; SAMPLES_PER_RECORD],
}

/// A record after baseline subtraction: signal positive, in ADC counts above baseline.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Record {
    time: i64,
    length: i32,
    dt: i16,
    channel: i16,
    pulse_length: i32,
    record_i: i16,
    n_hits: i16,
    /// Sum of the samples.
    area: i32,
    /// The pulse's baseline (mean of its first samples).
    baseline: f32,
    _pad: u32,
    data: [i16; SAMPLES_PER_RECORD],
}

/// A run of samples above threshold in one record.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Hit {
    time: i64,
    length: i32,
    dt: i16,
    channel: i16,
    area: i32,
    height: i16,
    /// First sample of the hit in its record.
    left: i16,
    /// Index of its record in the chunk.
    record_i: u32,
    _pad: u32,
}

/// A cluster of hits over all channels.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Peak {
    time: i64,
    /// Samples of `dt` from `time` to the end of the last hit.
    length: i32,
    dt: i32,
    area: f32,
    /// Largest bin of `waveform`, per sample.
    height: f32,
    n_hits: u32,
    n_channels: u16,
    /// The channel that saw the most area.
    max_channel: i16,
    /// Nanoseconds per bin of `waveform`.
    waveform_dt: i32,
    _pad: u32,
    /// The summed waveform of the hits, in bins of `waveform_dt` from `time`.
    waveform: [f32; WAVEFORM_BINS],
}

/// A window around one or more triggering peaks, with the peaks fully inside it.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
struct Event {
    time: i64,
    endtime: i64,
    /// Numbered from 0 over the run, in time order; -1 until numbered.
    event_number: i64,
    /// Start of the largest peak.
    main_time: i64,
    area: f32,
    main_area: f32,
    n_peaks: u32,
    n_triggers: u32,
}

/// The strax convention: `length` samples of `dt` from `time`.
macro_rules! sampled_interval {
    ($($t:ty),*) => {$(
        impl Interval for $t {
            fn start(&self) -> i64 {
                self.time
            }
            fn end(&self) -> i64 {
                self.time + self.length as i64 * self.dt as i64
            }
        }
    )*};
}
sampled_interval!(RawRecord, Record, Hit, Peak);

impl Interval for Event {
    fn start(&self) -> i64 {
        self.time
    }
    fn end(&self) -> i64 {
        self.endtime
    }
}

/// What the digitizer sends: a chunk of raw records and the time it covers.
type RawChunk = (Records<RawRecord>, TimeRange);

/// What goes with a chunk's records: its range and its hits, sorted by time.
#[derive(Archive, Serialize)]
struct RecordsMeta {
    range: TimeRange,
    hits: Records<Hit>,
}
type RecordsChunk = (Records<Record>, RecordsMeta);

/// What goes with a chunk's peaks and events: its range and the tally of what the stages
/// received.
#[derive(Archive, Serialize)]
struct ChunkMeta {
    range: TimeRange,
    tally: Tally,
}
type PeaksChunk = (Records<Peak>, ChunkMeta);
type EventsChunk = (Records<Event>, ChunkMeta);

/// Counts and digests of the records, hits and peaks a chunk's stages received.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    records: u64,
    hits: u64,
    peaks: u64,
    records_digest: u64,
    hits_digest: u64,
    peaks_digest: u64,
}

impl Tally {
    fn of_records(records: &[Record], hits: &[Hit]) -> Tally {
        Tally {
            records: records.len() as u64,
            hits: hits.len() as u64,
            records_digest: digest(records),
            hits_digest: digest(hits),
            ..Tally::default()
        }
    }

    fn with_peaks(self, peaks: &[Peak]) -> Tally {
        Tally {
            peaks: peaks.len() as u64,
            peaks_digest: digest(peaks),
            ..self
        }
    }
}

/// A Fletcher-style digest of the items' bytes, as 64-bit words: order-sensitive and cheap.
fn digest<T: Pod>(items: &[T]) -> u64 {
    let bytes: &[u8] = bytemuck::cast_slice(items);
    let (mut a, mut b) = (0u64, 0u64);
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        b = b.wrapping_add(a);
    }
    for &byte in tail {
        a = a.wrapping_add(u64::from(byte));
        b = b.wrapping_add(a);
    }
    a ^ b.rotate_left(32) ^ bytes.len() as u64
}

/// `a / b` rounded up, for `a >= 0`, `b > 0`.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// A chunk's number in the run, for error messages (the chunks are all of one length).
fn chunk_index(range: TimeRange) -> u64 {
    (range.start() - RUN_START_NS) as u64 / range.len().max(1)
}

// ---------------------------------------------------------------------------------------------
// The processing: plain functions over slices, shared by the stages and the reference.

/// `records`: one record per raw record into `records` (at least `raw.len()` long), and the
/// hits into `hits`, sorted by time. Each pulse's baseline comes from its first record.
fn process_records(
    range: TimeRange,
    raw: &[RawRecord],
    records: &mut [Record],
    hits: &mut Vec<Hit>,
) -> Result<(), BoxError> {
    check_chunk(chunk_index(range), range, raw)?;
    if records.len() < raw.len() {
        return Err(format!("room for {} records of {}", records.len(), raw.len()).into());
    }
    hits.clear();
    // The baseline of the pulse each channel is in (its records come in order).
    let mut pulse_baseline: [Option<(f32, i32)>; CHANNELS] = [None; CHANNELS];
    for (i, (r, out)) in raw.iter().zip(records.iter_mut()).enumerate() {
        let ch = usize::try_from(r.channel)
            .ok()
            .filter(|&c| c < CHANNELS)
            .ok_or_else(|| format!("raw record {i}: no channel {}", r.channel))?;
        let len = usize::try_from(r.length)
            .unwrap_or(0)
            .min(SAMPLES_PER_RECORD);
        let samples = &r.data[..len];
        // A pulse whose first record is missing takes its baseline from the record at hand.
        if r.record_i == 0 || pulse_baseline[ch].is_none() {
            let n = len.min(BASELINE_SAMPLES);
            pulse_baseline[ch] = Some(if n == 0 {
                (r.baseline as f32, r.baseline as i32)
            } else {
                let sum: i32 = samples[..n].iter().map(|&s| s as i32).sum();
                (sum as f32 / n as f32, sum / n as i32)
            });
        }
        let (baseline, bl) = pulse_baseline[ch].expect("set above");
        let mut data = [0i16; SAMPLES_PER_RECORD];
        let mut area = 0i32;
        for (d, &s) in data.iter_mut().zip(samples) {
            let v = (bl - s as i32).clamp(i16::MIN as i32, i16::MAX as i32);
            *d = v as i16;
            area += v;
        }
        let before = hits.len();
        let mut j = 0;
        while j < len {
            if data[j] <= HIT_THRESHOLD {
                j += 1;
                continue;
            }
            let left = j;
            let (mut hit_area, mut height) = (0i32, 0i16);
            while j < len && data[j] > HIT_THRESHOLD {
                hit_area += data[j] as i32;
                height = height.max(data[j]);
                j += 1;
            }
            hits.push(Hit {
                time: r.time + left as i64 * r.dt as i64,
                length: (j - left) as i32,
                dt: r.dt,
                channel: r.channel,
                area: hit_area,
                height,
                left: left as i16,
                record_i: i as u32,
                _pad: 0,
            });
        }
        *out = Record {
            time: r.time,
            length: len as i32,
            dt: r.dt,
            channel: r.channel,
            pulse_length: r.pulse_length,
            record_i: r.record_i,
            n_hits: (hits.len() - before) as i16,
            area,
            baseline,
            _pad: 0,
            data,
        };
    }
    // Hits of one record are in time order, but channels overlap in time.
    hits.sort_by_key(|h| (h.time, h.channel));
    Ok(())
}

/// `peaks`: clusters `hits` (sorted by time) into peaks, written into `peaks` (at least
/// `hits.len()` long: a peak has one hit or more); returns how many. Checks that the peaks lie
/// inside the chunk: the generator keeps its edges quiet, so none crosses a boundary.
fn find_peaks(
    range: TimeRange,
    records: &[Record],
    hits: &[Hit],
    peaks: &mut [Peak],
) -> Result<usize, BoxError> {
    if peaks.len() < hits.len() {
        return Err(format!("room for {} peaks of {} hits", peaks.len(), hits.len()).into());
    }
    let (mut n, mut i) = (0, 0);
    while i < hits.len() {
        let mut end = hits[i].end();
        let mut j = i + 1;
        while j < hits.len() && hits[j].start() - end < PEAK_GAP_NS {
            end = end.max(hits[j].end());
            j += 1;
        }
        peaks[n] = peak_of(records, &hits[i..j], end)?;
        n += 1;
        i = j;
    }
    check_chunk(chunk_index(range), range, &peaks[..n])?;
    Ok(n)
}

/// The peak of `hits` (sorted, at least one), which ends at `end`.
fn peak_of(records: &[Record], hits: &[Hit], end: i64) -> Result<Peak, BoxError> {
    let time = hits[0].time;
    let length = ceil_div(end - time, DT);
    let per_bin = ceil_div(length, WAVEFORM_BINS as i64).max(1);
    let waveform_dt = per_bin * DT;
    let mut waveform = [0f32; WAVEFORM_BINS];
    let mut per_channel = [0i64; CHANNELS];
    let (mut area, mut channels) = (0i64, 0u64);
    for h in hits {
        let ch = h.channel as usize % CHANNELS;
        per_channel[ch] += h.area as i64;
        channels |= 1 << ch;
        area += h.area as i64;
        let (left, len) = (h.left as usize, h.length as usize);
        let samples = records
            .get(h.record_i as usize)
            .and_then(|r| r.data.get(left..left + len))
            .ok_or_else(|| format!("hit at {} points past its record", h.time))?;
        // Walk the bins along the hit instead of dividing per sample.
        let mut bin = ((h.time - time) / waveform_dt) as usize;
        let mut bin_end = time + (bin as i64 + 1) * waveform_dt;
        let mut t = h.time;
        for &s in samples {
            while t >= bin_end {
                bin += 1;
                bin_end += waveform_dt;
            }
            waveform[bin.min(WAVEFORM_BINS - 1)] += s as f32;
            t += h.dt as i64;
        }
    }
    let max_channel = (0..CHANNELS)
        .max_by_key(|&c| (per_channel[c], std::cmp::Reverse(c)))
        .unwrap_or(0);
    let height = waveform.iter().cloned().fold(0f32, f32::max) / per_bin as f32;
    Ok(Peak {
        time,
        length: length as i32,
        dt: DT as i32,
        area: area as f32,
        height,
        n_hits: hits.len() as u32,
        n_channels: channels.count_ones() as u16,
        max_channel: max_channel as i16,
        waveform_dt: waveform_dt as i32,
        _pad: 0,
        waveform,
    })
}

/// `events`: a window `[start - LEFT, end + RIGHT)` around each peak of at least
/// `TRIGGER_AREA`, clipped to the chunk, overlapping windows merged; each window with the
/// peaks fully inside it is an event, written into `events` (at least `peaks.len()` long);
/// returns how many. `windows` is scratch.
fn build_events(
    range: TimeRange,
    peaks: &[Peak],
    windows: &mut Vec<TimeRange>,
    events: &mut [Event],
) -> Result<usize, BoxError> {
    windows.clear();
    for p in peaks.iter().filter(|p| p.area >= TRIGGER_AREA) {
        let start = (p.start() - EVENT_LEFT_NS).max(range.start());
        let end = (p.end() + EVENT_RIGHT_NS).min(range.end());
        match windows.last_mut() {
            Some(w) if start < w.end() => *w = TimeRange::new(w.start(), end.max(w.end()))?,
            _ => windows.push(TimeRange::new(start, end)?),
        }
    }
    if events.len() < windows.len() {
        return Err(format!("room for {} events of {}", events.len(), windows.len()).into());
    }
    let inside = split_by_containment(windows, peaks)?;
    for ((w, group), e) in windows.iter().zip(inside).zip(events.iter_mut()) {
        let group = &peaks[group];
        let main = group
            .iter()
            .reduce(|a, b| if b.area > a.area { b } else { a });
        *e = Event {
            time: w.start(),
            endtime: w.end(),
            event_number: -1,
            main_time: main.map_or(w.start(), |p| p.time),
            area: group.iter().map(|p| p.area).sum(),
            main_area: main.map_or(0.0, |p| p.area),
            n_peaks: group.len() as u32,
            n_triggers: group.iter().filter(|p| p.area >= TRIGGER_AREA).count() as u32,
        };
    }
    let n = windows.len();
    check_chunk(chunk_index(range), range, &events[..n])?;
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// The stages: each reads its input in place and writes its output records in place.

/// What `process` says: a task that writes in place has its work in `produce`.
const IN_PLACE: &str = "this task writes its output in place: it runs through produce";

/// `records`: raw records in, records written straight into the output slot, hits after them.
struct RecordsStage;

impl Task for RecordsStage {
    type Input = RawChunk;
    type Output = RecordsChunk;

    /// Never called: the worker calls `produce`, which writes the output in place.
    fn process(&mut self, _: &Archived<RawChunk>) -> Result<RecordsChunk, BoxError> {
        Err(IN_PLACE.into())
    }

    fn produce(
        &mut self,
        chunk: &Archived<RawChunk>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let (raw, range) = (chunk.0.records(), chunk.1.to_native());
        out.emit_records_up_to(raw.len(), |records: &mut [Record]| {
            let mut hits = Vec::with_capacity(raw.len() * 2);
            process_records(range, raw, records, &mut hits)?;
            let hits = Records(hits);
            Ok((raw.len(), RecordsMeta { range, hits }))
        })
    }
}

/// `peaks`: records and hits in, peaks written in place (at most one per hit).
struct PeaksStage;

impl Task for PeaksStage {
    type Input = RecordsChunk;
    type Output = PeaksChunk;

    /// Never called: the worker calls `produce`, which writes the output in place.
    fn process(&mut self, _: &Archived<RecordsChunk>) -> Result<PeaksChunk, BoxError> {
        Err(IN_PLACE.into())
    }

    fn produce(
        &mut self,
        chunk: &Archived<RecordsChunk>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let (records, hits, range) = read_records_chunk(chunk);
        let tally = Tally::of_records(records, hits);
        out.emit_records_up_to(hits.len(), |peaks: &mut [Peak]| {
            let n = find_peaks(range, records, hits, peaks)?;
            Ok((n, ChunkMeta { range, tally }))
        })
    }
}

fn read_records_chunk(chunk: &Archived<RecordsChunk>) -> (&[Record], &[Hit], TimeRange) {
    (
        chunk.0.records(),
        chunk.1.hits.records(),
        chunk.1.range.to_native(),
    )
}

/// `events`: peaks in, events written in place (at most one per peak).
#[derive(Default)]
struct EventsStage {
    windows: Vec<TimeRange>,
}

impl Task for EventsStage {
    type Input = PeaksChunk;
    type Output = EventsChunk;

    /// Never called: the worker calls `produce`, which writes the output in place.
    fn process(&mut self, _: &Archived<PeaksChunk>) -> Result<EventsChunk, BoxError> {
        Err(IN_PLACE.into())
    }

    fn produce(
        &mut self,
        chunk: &Archived<PeaksChunk>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let (peaks, range) = (chunk.0.records(), chunk.1.range.to_native());
        let tally = native_tally(&chunk.1.tally)?.with_peaks(peaks);
        let windows = &mut self.windows;
        out.emit_records_up_to(peaks.len(), |events: &mut [Event]| {
            let n = build_events(range, peaks, windows, events)?;
            Ok((n, ChunkMeta { range, tally }))
        })
    }
}

fn native_tally(t: &Archived<Tally>) -> Result<Tally, BoxError> {
    Ok(rkyv::deserialize::<Tally, rkyv::rancor::Error>(t)?)
}

/// `numbering`: the chunk's events with their numbers, on from the last chunk's. It runs on one
/// worker that sees every chunk in input order; its state is saved after every chunk and a
/// successor of a worker that died restores it, so no number is given twice or skipped. Each
/// pass of the pipeline starts from the default state: numbered from 0.
struct Numbering;

/// What `numbering` carries from one chunk to the next.
#[derive(Archive, Serialize, Deserialize, Default)]
struct NumberingState {
    /// The next event's number.
    next: i64,
}

impl Stateful for Numbering {
    type Input = EventsChunk;
    type Output = EventsChunk;
    type State = NumberingState;

    fn process(
        &mut self,
        state: &mut NumberingState,
        chunk: &Archived<EventsChunk>,
    ) -> Result<EventsChunk, BoxError> {
        let range = chunk.1.range.to_native();
        let mut events = chunk.0.records().to_vec();
        state.next = number_from(state.next, &mut events);
        let tally = native_tally(&chunk.1.tally)?;
        Ok((Records(events), ChunkMeta { range, tally }))
    }
}

/// `records`, `peaks` and `events` fused by hand into one task: the same functions,
/// intermediates in buffers the task keeps from chunk to chunk (grown when a chunk needs more,
/// never cleared). The coordinator numbers the events ([`number_events`]).
#[derive(Default)]
struct ByHand {
    records: Vec<Record>,
    hits: Vec<Hit>,
    peaks: Vec<Peak>,
    windows: Vec<TimeRange>,
}

impl ByHand {
    /// Records and peaks of a chunk into the task's buffers; returns the number of peaks and
    /// the tally.
    fn records_and_peaks(
        &mut self,
        raw: &[RawRecord],
        range: TimeRange,
    ) -> Result<(usize, Tally), BoxError> {
        grow(&mut self.records, raw.len());
        let records = &mut self.records[..raw.len()];
        process_records(range, raw, records, &mut self.hits)?;
        grow(&mut self.peaks, self.hits.len());
        let n = find_peaks(range, records, &self.hits, &mut self.peaks)?;
        let tally = Tally::of_records(records, &self.hits).with_peaks(&self.peaks[..n]);
        Ok((n, tally))
    }
}

/// Makes `v` at least `len` long.
fn grow<T: Pod>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::zeroed());
    }
}

impl Task for ByHand {
    type Input = RawChunk;
    type Output = EventsChunk;

    /// Never called: the worker calls `produce`, which writes the output in place.
    fn process(&mut self, _: &Archived<RawChunk>) -> Result<EventsChunk, BoxError> {
        Err(IN_PLACE.into())
    }

    fn produce(
        &mut self,
        chunk: &Archived<RawChunk>,
        out: &mut OutputSink<'_>,
    ) -> Result<(), BoxError> {
        let range = chunk.1.to_native();
        let (n, tally) = self.records_and_peaks(chunk.0.records(), range)?;
        let (peaks, windows) = (&self.peaks[..n], &mut self.windows);
        out.emit_records_up_to(peaks.len(), |events: &mut [Event]| {
            let n = build_events(range, peaks, windows, events)?;
            Ok((n, ChunkMeta { range, tally }))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The reference: the same functions, one chunk after the other, in this thread.

/// What a chunk gave: its range, its events and the tally of its stages.
#[derive(Clone, Debug, PartialEq)]
struct ChunkResult {
    range: TimeRange,
    events: Vec<Event>,
    tally: Tally,
}

fn reference(chunk: &RawChunk) -> Result<ChunkResult, BoxError> {
    let (raw, range) = (&chunk.0.0[..], chunk.1);
    let mut records = vec![Record::zeroed(); raw.len()];
    let mut hits = Vec::new();
    process_records(range, raw, &mut records, &mut hits)?;
    let mut peaks = vec![Peak::zeroed(); hits.len()];
    let n = find_peaks(range, &records, &hits, &mut peaks)?;
    peaks.truncate(n);
    let tally = Tally::of_records(&records, &hits).with_peaks(&peaks);
    let mut events = vec![Event::zeroed(); peaks.len()];
    let n = build_events(range, &peaks, &mut Vec::new(), &mut events)?;
    events.truncate(n);
    Ok(ChunkResult {
        range,
        events,
        tally,
    })
}

/// Numbers the run's events 0, 1, 2... in chunk order (chunks come in time order): a
/// computation over the whole stream, which no parallel stage can do.
fn number_events(chunks: &mut [ChunkResult]) {
    let mut next = 0;
    for c in chunks {
        next = number_from(next, &mut c.events);
    }
}

/// Numbers `events` from `first` on; returns the number after the last.
fn number_from(first: i64, events: &mut [Event]) -> i64 {
    let mut next = first;
    for e in events {
        e.event_number = next;
        next += 1;
    }
    next
}

// ---------------------------------------------------------------------------------------------
// Running the pipelines.

/// The chunks' results of a run, in input order (the first error, if any, as the error).
fn collect(
    results: impl Iterator<Item = shmexec::Result<OutputRef<EventsChunk>>>,
) -> Result<Vec<ChunkResult>, BoxError> {
    let mut chunks = Vec::new();
    for result in results {
        let out = result?;
        chunks.push(ChunkResult {
            range: out.1.range.to_native(),
            events: out.0.records().to_vec(),
            tally: native_tally(&out.1.tally)?,
        });
    }
    Ok(chunks)
}

/// How many chunks of `got` differ from `want`; the first few are printed.
fn mismatches(name: &str, got: &[ChunkResult], want: &[ChunkResult]) -> usize {
    if got.len() != want.len() {
        eprintln!("{name}: {} chunks, want {}", got.len(), want.len());
        return want.len().max(1);
    }
    let mut bad = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        bad += 1;
        if bad <= 3 {
            eprintln!("{name}: chunk {i} {} differs from the reference", w.range);
            if g.tally != w.tally {
                eprintln!("  tally {:?}\n   want {:?}", g.tally, w.tally);
            }
            match g.events.iter().zip(&w.events).position(|(a, b)| a != b) {
                Some(k) => eprintln!("  event {k}: {:?}\n   want {:?}", g.events[k], w.events[k]),
                None if g.events.len() != w.events.len() => {
                    eprintln!("  {} events, want {}", g.events.len(), w.events.len())
                }
                None => {}
            }
        }
    }
    bad
}

fn print_stages(stats: &PipelineStats, by_hand: &PipelineStats) {
    println!(
        "{:<18} {:>5} {:>7} {:>6} {:>8} {:>10} {:>10} {:>8} {:>12}",
        "stage", "group", "workers", "items", "outputs", "MB in", "MB out", "busy s", "MB/s/worker"
    );
    for (s, note) in stats
        .stages
        .iter()
        .map(|s| (s, ""))
        .chain(by_hand.stages.iter().map(|s| (s, " (one task)")))
    {
        println!(
            "{:<18} {:>5} {:>7} {:>6} {:>8} {:>10.1} {:>10.1} {:>8.3} {:>12.0}",
            format!("{}{note}", s.name),
            s.group,
            s.workers,
            s.items,
            s.outputs,
            s.bytes_in as f64 / 1e6,
            s.bytes_out as f64 / 1e6,
            s.busy.as_secs_f64(),
            s.mbps_per_worker()
        );
    }
}

/// 0 if `ok`; else 1, and says `what` went wrong.
fn check(ok: bool, what: &str) -> usize {
    if !ok {
        eprintln!("daq_pipeline: {what}");
    }
    usize::from(!ok)
}

/// The counters of stage `name`.
fn stage<'s>(stats: &'s PipelineStats, name: &str) -> &'s StageStats {
    stats
        .stages
        .iter()
        .find(|s| s.name == name)
        .expect("a stage of the pipeline")
}

/// The store the pipeline saves `peaks` in: the directory `--store` names (kept), or a fresh
/// one of this process in the temporary directory, removed when this is dropped.
struct StoreDir {
    store: Store,
    /// Whether the directory is this process's, to remove.
    temporary: bool,
}

impl StoreDir {
    fn open(dir: Option<&Path>) -> Result<StoreDir, BoxError> {
        let (dir, temporary) = match dir {
            Some(dir) => (dir.to_owned(), false),
            None => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let name = format!("shmexec-daq-{}-{nanos:x}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        let store = Store::open(&dir)?;
        Ok(StoreDir { store, temporary })
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        if self.temporary
            && let Err(e) = std::fs::remove_dir_all(self.store.path())
        {
            eprintln!(
                "daq_pipeline: cannot remove the store {}: {e}",
                self.store.path().display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Synthetic digitizer.

/// SplitMix64: a small, seeded, deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Light in one channel: `samples` samples from `time`, a fast pulse (`broad` false: a
/// photoelectron or an S1) or a Gaussian of width `samples / 6` (an S2).
struct Signal {
    time: i64,
    samples: i64,
    amplitude: f32,
    broad: bool,
}

impl Signal {
    fn fast(time: i64, amplitude: f32) -> Signal {
        Signal {
            time,
            samples: FAST_SAMPLES,
            amplitude,
            broad: false,
        }
    }

    fn end(&self) -> i64 {
        self.time + self.samples * DT
    }
}

/// Samples of a fast pulse.
const FAST_SAMPLES: i64 = 16;
/// Resolution of the Gaussian table.
const GAUSS_STEPS: i64 = 1024;

/// The digitizer: pulses on random channels, cut into records, chunk by chunk. A chunk is
/// the same whatever order the chunks are made in.
struct Digitizer {
    records_per_chunk: usize,
    chunk_ns: i64,
    fast: [f32; FAST_SAMPLES as usize],
    /// `exp(-x^2 / 2)` for `x` from -3 to 3.
    gauss: Vec<f32>,
}

impl Digitizer {
    fn new(records_per_chunk: usize) -> Digitizer {
        let mut fast = [0f32; FAST_SAMPLES as usize];
        for (i, f) in fast.iter_mut().enumerate() {
            let t = i as f32;
            *f = (1.0 - (-(t + 1.0)).exp()) * (-t / 3.0).exp();
        }
        let gauss = (0..=GAUSS_STEPS)
            .map(|k| {
                let x = 6.0 * k as f32 / GAUSS_STEPS as f32 - 3.0;
                (-0.5 * x * x).exp()
            })
            .collect();
        Digitizer {
            records_per_chunk,
            chunk_ns: (records_per_chunk as i64 * NS_PER_RECORD).max(8 * QUIET_NS),
            fast,
            gauss,
        }
    }

    fn range(&self, index: u64) -> TimeRange {
        let start = RUN_START_NS + index as i64 * self.chunk_ns;
        TimeRange::new(start, start + self.chunk_ns).expect("a forward range")
    }

    /// Records an upper bound on the raw records of one chunk (for sizing the rings).
    fn max_records(&self) -> usize {
        // The loop stops at the target; one interaction adds at most 12 + 32 signals of at
        // most 4 records each.
        self.records_per_chunk + 44 * 4
    }

    fn chunk(&self, index: u64) -> RawChunk {
        let mut rng = Rng(SEED ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
        let range = self.range(index);
        let (lo, hi) = (range.start() + QUIET_NS, range.end() - QUIET_NS);
        let mut signals: Vec<Vec<Signal>> = (0..CHANNELS).map(|_| Vec::new()).collect();
        // Signals merge into pulses, so add them until the pulses hold enough records.
        let (mut pulses, mut records) = (Vec::new(), 0);
        while records < self.records_per_chunk {
            let mut estimate = records;
            while estimate < self.records_per_chunk {
                estimate += add_source(&mut rng, &mut signals, lo, hi);
            }
            pulses = pulses_of(&mut signals);
            records = pulses.iter().map(|p| p.records()).sum();
        }
        let mut raw = Vec::with_capacity(records);
        for p in &pulses {
            self.render(
                &mut raw,
                &mut rng,
                p,
                &signals[p.channel][p.signals.clone()],
            );
        }
        raw.sort_by_key(|r| (r.time, r.channel));
        (Records(raw), range)
    }

    /// Appends the records of `pulse`, made of `signals`.
    fn render(&self, raw: &mut Vec<RawRecord>, rng: &mut Rng, pulse: &Pulse, signals: &[Signal]) {
        let (channel, start) = (pulse.channel, pulse.start);
        let n = pulse.samples();
        let base = (NOMINAL_BASELINE as i32 + (channel as i32 * 37) % 61 - 30) as f32;
        for record_i in 0..ceil_div(n, SAMPLES_PER_RECORD as i64) {
            let first = record_i * SAMPLES_PER_RECORD as i64;
            let length = (n - first).min(SAMPLES_PER_RECORD as i64);
            let mut data = [0i16; SAMPLES_PER_RECORD];
            for (j, d) in data[..length as usize].iter_mut().enumerate() {
                let t = start + (first + j as i64) * DT;
                let mut v = base + (rng.below(7) as f32 - 3.0);
                for s in signals {
                    let k = (t - s.time) / DT;
                    if t < s.time || k >= s.samples {
                        continue;
                    }
                    v -= s.amplitude
                        * if s.broad {
                            self.gauss[(k * GAUSS_STEPS / s.samples) as usize]
                        } else {
                            self.fast[k as usize]
                        };
                }
                *d = v.round().clamp(0.0, 16_383.0) as i16;
            }
            raw.push(RawRecord {
                time: start + first * DT,
                length: length as i32,
                dt: DT as i16,
                channel: channel as i16,
                pulse_length: n as i32,
                record_i: record_i as i16,
                baseline: NOMINAL_BASELINE,
                _pad: 0,
                data,
            });
        }
    }
}

/// Adds one source of light at a random time in `[lo, hi)`: an interaction (a prompt S1 on a
/// few channels, an S2 on most of them microseconds later) or, mostly, a lone photoelectron.
/// Returns how many records its signals would take alone.
fn add_source(rng: &mut Rng, signals: &mut [Vec<Signal>], lo: i64, hi: i64) -> usize {
    let at = |rng: &mut Rng, hi: i64| lo + rng.below(((hi - lo) / DT) as u64) as i64 * DT;
    let mut records = 0;
    let mut add = |rng: &mut Rng, signal: Signal| {
        records += Pulse::records_of(signal.samples);
        signals[rng.below(CHANNELS as u64) as usize].push(signal);
    };
    if rng.uniform() >= 0.05 {
        let time = at(rng, hi - 1_000);
        let amplitude = 25.0 + rng.below(55) as f32;
        add(rng, Signal::fast(time, amplitude));
        return records;
    }
    let t = at(rng, hi - 15_000);
    for _ in 0..4 + rng.below(9) {
        let time = t + rng.below(4) as i64 * DT;
        let amplitude = 30.0 + rng.below(170) as f32;
        add(rng, Signal::fast(time, amplitude));
    }
    let t2 = t + (100 + rng.below(700) as i64) * DT;
    let samples = 6 * (20 + rng.below(40) as i64);
    for _ in 0..16 + rng.below(17) {
        let time = t2 + rng.below(20) as i64 * DT;
        let amplitude = 20.0 + rng.below(130) as f32;
        add(
            rng,
            Signal {
                time,
                samples,
                amplitude,
                broad: true,
            },
        );
    }
    records
}

/// One digitizer pulse: `[start, end)` of one channel, holding the signals of that channel at
/// `signals` (in their order by time).
struct Pulse {
    channel: usize,
    start: i64,
    end: i64,
    signals: std::ops::Range<usize>,
}

impl Pulse {
    fn samples(&self) -> i64 {
        (self.end - self.start) / DT
    }

    fn records(&self) -> usize {
        ceil_div(self.samples(), SAMPLES_PER_RECORD as i64) as usize
    }

    /// Records of a pulse of one signal of `samples`.
    fn records_of(samples: i64) -> usize {
        ceil_div(
            PRE_TRIGGER + samples + POST_TRIGGER,
            SAMPLES_PER_RECORD as i64,
        ) as usize
    }
}

/// Sorts each channel's signals by time and groups them into pulses: signals whose windows
/// overlap make one pulse, as a self-triggering digitizer extends its window.
fn pulses_of(signals: &mut [Vec<Signal>]) -> Vec<Pulse> {
    let mut pulses = Vec::new();
    for (channel, signals) in signals.iter_mut().enumerate() {
        signals.sort_by_key(|s| s.time);
        let mut k = 0;
        while k < signals.len() {
            let start = signals[k].time - PRE_TRIGGER * DT;
            let mut end = signals[k].end() + POST_TRIGGER * DT;
            let mut m = k + 1;
            while m < signals.len() && signals[m].time - PRE_TRIGGER * DT <= end {
                end = end.max(signals[m].end() + POST_TRIGGER * DT);
                m += 1;
            }
            pulses.push(Pulse {
                channel,
                start,
                end,
                signals: k..m,
            });
            k = m;
        }
    }
    pulses
}

// ---------------------------------------------------------------------------------------------

struct Args {
    chunks: u64,
    records_per_chunk: usize,
    workers: Option<usize>,
    store: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        chunks: 64,
        records_per_chunk: 10_000,
        workers: None,
        store: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--chunks" => a.chunks = value()?.parse().map_err(|e| format!("--chunks: {e}"))?,
            "--records-per-chunk" => {
                a.records_per_chunk = value()?
                    .parse()
                    .map_err(|e| format!("--records-per-chunk: {e}"))?
            }
            "--workers" => {
                a.workers = Some(value()?.parse().map_err(|e| format!("--workers: {e}"))?)
            }
            "--store" => a.store = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                return Err("usage: daq_pipeline [--chunks N] [--records-per-chunk M] \
                            [--workers W] [--store DIR]"
                    .into());
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    if a.chunks == 0 || a.records_per_chunk == 0 || a.workers == Some(0) {
        return Err("--chunks, --records-per-chunk and --workers must be at least 1".into());
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    match run_all(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("daq_pipeline: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs everything; `Ok(false)` if a result differs from the reference or a check fails.
fn run_all(args: &Args) -> Result<bool, BoxError> {
    let digitizer = Digitizer::new(args.records_per_chunk);
    // Input rings that hold a few of the largest chunks.
    let max_chunk = digitizer.max_records() * size_of::<RawRecord>() + 4096;
    let ring = DEFAULT_RING_BYTES.max((4 * max_chunk).next_multiple_of(1 << 20));
    let pool = || {
        let b = Pool::builder().input_ring_bytes(ring);
        match args.workers {
            Some(w) => b.workers(w),
            None => b,
        }
    };
    // Declared before the pipeline, so it is removed after the pipeline is gone.
    let store = StoreDir::open(args.store.as_deref())?;
    // Workers are forked before anything else is made.
    let mut pipeline = Pipeline::<RawChunk>::builder()
        .map("records", RecordsStage)
        .version("1")
        .config(records_config())
        .map("peaks", PeaksStage)
        .version("1")
        .config(peaks_config())
        .save(&store.store)
        .map("events", EventsStage::default())
        .stateful("numbering", Numbering)
        .build(pool())?;
    let mut by_hand = Pipeline::<RawChunk>::builder()
        .map("by_hand", ByHand::default())
        .build(pool())?;
    let workers = pipeline.plan().workers()[0];

    let t = Instant::now();
    let inputs: Vec<RawChunk> = (0..args.chunks).map(|i| digitizer.chunk(i)).collect();
    let raw_records: usize = inputs.iter().map(|c| c.0.0.len()).sum();
    let raw_bytes = (raw_records * size_of::<RawRecord>()) as f64;
    let mbps = |d: Duration| raw_bytes / 1e6 / d.as_secs_f64();
    println!(
        "daq_pipeline: {} chunks of ~{} raw records ({} in all, {:.1} MB), {CHANNELS} channels, \
         generated in {:.2} s",
        args.chunks,
        args.records_per_chunk,
        raw_records,
        raw_bytes / 1e6,
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let mut want = inputs
        .iter()
        .map(reference)
        .collect::<Result<Vec<_>, _>>()?;
    number_events(&mut want);
    let reference_time = t.elapsed();
    let sum = |f: fn(&ChunkResult) -> u64| want.iter().map(f).sum::<u64>();
    let events = sum(|c| c.events.len() as u64);
    println!(
        "reference (one thread, no shmexec): {:.2} s, {:.0} MB/s: {} records, {} hits, {} peaks, \
         {events} events",
        reference_time.as_secs_f64(),
        mbps(reference_time),
        sum(|c| c.tally.records),
        sum(|c| c.tally.hits),
        sum(|c| c.tally.peaks),
    );
    println!("plan:");
    for line in pipeline.plan().to_string().lines() {
        println!("  {line}");
    }
    println!(
        "store: {}{}",
        store.store.path().display(),
        if store.temporary {
            " (removed at exit)"
        } else {
            ""
        }
    );

    let mut bad = 0;

    // The synthetic run, named by what makes its data: a change of seed or sizes is another
    // run, whose peaks are computed again.
    let source = StageKey::new(
        "raw_records",
        format!(
            "synthetic seed={SEED:#x} chunks={} records_per_chunk={}",
            args.chunks, args.records_per_chunk
        ),
        b"",
    );
    let keys = pipeline.keys(&source);
    let peaks_key = keys
        .iter()
        .find(|k| k.name() == "peaks")
        .expect("a key per stage");
    let saved_before = store.store.load(peaks_key)?.is_some();

    // First run: computes every stage and saves peaks (unless an earlier invocation saved them
    // in the store given).
    let t = Instant::now();
    let mut run = pipeline.run_keyed(&source, &inputs)?;
    let hit = run.cache().cloned();
    let got = collect(run.by_ref())?;
    let saved = run.saved().to_vec();
    drop(run);
    let first = t.elapsed();
    bad += mismatches("first run", &got, &want);
    match &hit {
        None => {
            let chunks = store.store.load(peaks_key)?.map(|s| s.chunks());
            println!(
                "first run: {:.3} s, every stage ran; saved {saved:?} ({} chunks, as {}-{}… in \
                 the store)",
                first.as_secs_f64(),
                chunks.unwrap_or(0),
                peaks_key.name(),
                &peaks_key.id()[..12],
            );
            bad += check(
                saved == ["peaks"] && chunks == Some(args.chunks as usize),
                "the first run did not save the peaks of every chunk",
            );
        }
        Some(hit) => println!(
            "first run: {:.3} s, served from '{}' ({} chunks) saved by an earlier invocation",
            first.as_secs_f64(),
            hit.stage,
            hit.chunks
        ),
    }
    bad += check(
        hit.is_some() == saved_before,
        "the first run was served from the store iff the peaks were saved before it",
    );

    // Second run: served from the saved peaks.
    let before = pipeline.stats();
    let t = Instant::now();
    let mut run = pipeline.run_keyed(&source, &inputs)?;
    let hit = run.cache().cloned();
    let got = collect(run.by_ref())?;
    drop(run);
    let second = t.elapsed();
    let used = pipeline.stats().since(&before);
    bad += mismatches("second run", &got, &want);
    let items = |name: &str| stage(&used, name).items;
    let not_run = items("records") == 0 && items("peaks") == 0;
    match &hit {
        Some(hit) => println!(
            "second run: served from saved '{}' ({} chunks): {}; {:.3} s, events {} and \
             numbering {} items",
            hit.stage,
            hit.chunks,
            if not_run {
                "records and peaks did not run"
            } else {
                "but records and peaks ran"
            },
            second.as_secs_f64(),
            items("events"),
            items("numbering"),
        ),
        None => println!("second run: not served from the store"),
    }
    bad += check(
        hit.as_ref()
            .is_some_and(|h| h.stage == "peaks" && h.chunks as u64 == args.chunks),
        "the second run was not served from the saved peaks of every chunk",
    );
    bad += check(not_run, "records or peaks ran in the second run");
    bad += check(
        items("events") == args.chunks && items("numbering") == args.chunks,
        "events or numbering did not see every chunk in the second run",
    );

    // Timing: uncached runs (no key: nothing loaded, nothing saved), three of each,
    // alternating; the best time of each, and the stage counters of that run.
    let (mut best_pipeline, mut best_by_hand) = (Duration::MAX, Duration::MAX);
    let (mut stages, mut by_hand_stages) = (pipeline.stats(), by_hand.stats());
    for _ in 0..3 {
        let before = pipeline.stats();
        let t = Instant::now();
        let got = collect(pipeline.run(&inputs))?;
        let d = t.elapsed();
        bad += mismatches("pipeline", &got, &want);
        if d < best_pipeline {
            (best_pipeline, stages) = (d, pipeline.stats().since(&before));
        }
        let before = by_hand.stats();
        let t = Instant::now();
        let mut got = collect(by_hand.run(&inputs))?;
        number_events(&mut got);
        let d = t.elapsed();
        bad += mismatches("by hand", &got, &want);
        if d < best_by_hand {
            (best_by_hand, by_hand_stages) = (d, by_hand.stats().since(&before));
        }
    }
    let copied = pipeline.stats().copied_between_groups;
    let groups = pipeline.plan().fused().len();
    drop((pipeline, by_hand));
    bad += check(copied == 0, "the coordinator copied items between groups");

    println!();
    print_stages(&stages, &by_hand_stages);
    println!();
    let (p, h) = (mbps(best_pipeline), mbps(best_by_hand));
    println!(
        "pipeline (4 stages, {groups} groups)   {:6.3} s {p:7.0} MB/s\n\
         by hand (one task + numbering)  {:6.3} s {h:7.0} MB/s\n\
         pipeline / by hand              {:.2}   ({workers} {}, best of 3 uncached runs each)",
        best_pipeline.as_secs_f64(),
        best_by_hand.as_secs_f64(),
        p / h,
        if workers == 1 { "worker" } else { "workers" }
    );
    println!(
        "chunks={} raw_records={raw_records} events={events} copied_between_groups={copied} \
         matches_reference={}",
        args.chunks,
        bad == 0
    );
    Ok(bad == 0)
}

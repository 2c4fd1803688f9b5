//! Turning local messages into timed property values, and collecting them
//! over a window so that OneNET receives at most one post per window
//! however fast the local topics change.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::model::{Millis, ReadingJson};

/// One value of one property, with the time it was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub value: Json,
    /// Milliseconds since the Unix epoch.
    pub time: Millis,
}

impl Sample {
    pub fn new(value: Json, time: Millis) -> Sample {
        Sample { value, time }
    }

    /// Reads a local payload: JSON numbers, booleans, objects and arrays are
    /// kept as they are; anything that is not JSON becomes a string. A
    /// payload in the shape a `payload: json` mapping produces
    /// (`{"value":…,"unit":…,"ts":…}`) posts its `value` with its `ts`, so
    /// the time is when the device was read, not when the bridge saw it.
    /// `received` is used when the payload carries no time. An empty payload
    /// is no value.
    pub fn from_local(payload: &[u8], received: Millis) -> Option<Sample> {
        let text = String::from_utf8_lossy(payload);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let Ok(json) = serde_json::from_str::<Json>(text) else {
            return Some(Sample::new(Json::String(text.to_string()), received));
        };
        if let Some(reading) = ReadingJson::parse(&json) {
            // A bad-quality reading has no value to post: the platform
            // would take the object for one.
            if !reading.is_good() {
                return None;
            }
            return Some(Sample::new(reading.value, reading.ts));
        }
        Some(Sample::new(json, received))
    }
}

/// Property (or data stream) name -> its samples in arrival order.
pub type Batch = BTreeMap<String, Vec<Sample>>;

/// Collects samples for one window. The window opens with the first sample
/// and is due `window` later; [`Batcher::take`] empties it.
#[derive(Debug)]
pub struct Batcher {
    window: Duration,
    /// At most this many samples are kept per property in one window; older
    /// ones are dropped first (a thing-model post carries only the latest).
    keep: usize,
    pending: Batch,
    opened: Option<Instant>,
    dropped: u64,
}

impl Batcher {
    pub fn new(window: Duration, keep: usize) -> Batcher {
        Batcher {
            window,
            keep: keep.max(1),
            pending: Batch::new(),
            opened: None,
            dropped: 0,
        }
    }

    pub fn push(&mut self, property: &str, sample: Sample, now: Instant) {
        self.opened.get_or_insert(now);
        let samples = self.pending.entry(property.to_string()).or_default();
        samples.push(sample);
        if samples.len() > self.keep {
            let extra = samples.len() - self.keep;
            samples.drain(..extra);
            self.dropped += extra as u64;
        }
    }

    /// When the open window is due, if one is open.
    pub fn due(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.window)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The window's samples; the next push opens a new window.
    pub fn take(&mut self) -> Batch {
        self.opened = None;
        std::mem::take(&mut self.pending)
    }

    /// Samples superseded within a window so far (they were never posted).
    pub fn superseded(&self) -> u64 {
        self.dropped
    }
}

/// The latest sample of each property (by `time`; on a tie the later
/// arrival), which is what a thing-model post carries.
pub fn latest(batch: &Batch) -> BTreeMap<&str, &Sample> {
    batch
        .iter()
        .filter_map(|(k, v)| {
            v.iter()
                .enumerate()
                .max_by_key(|(i, s)| (s.time, *i))
                .map(|(_, s)| (k.as_str(), s))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn local_payloads_become_typed_values() {
        let s = |p: &str| Sample::from_local(p.as_bytes(), 7).unwrap();
        assert_eq!(s("2.5").value, json!(2.5));
        assert_eq!(s(" 42\n").value, json!(42));
        assert_eq!(s("true").value, json!(true));
        assert_eq!(s(r#"{"a":1}"#).value, json!({"a":1}));
        assert_eq!(s("hello world").value, json!("hello world"));
        assert_eq!(s("on").value, json!("on"));
        assert_eq!(s("1").time, 7);
        assert_eq!(Sample::from_local(b"  ", 7), None);
    }

    #[test]
    fn a_bad_quality_reading_posts_nothing() {
        // Issue 18: its whole JSON object was posted as the value.
        let bad = br#"{"value":null,"error":"timeout","unit":"kW","ts":1700000000123}"#;
        assert_eq!(Sample::from_local(bad, 7), None);
        // A device's own JSON that merely has an `error` key among others
        // is still a value.
        let own = br#"{"error":0,"code":3}"#;
        assert!(Sample::from_local(own, 7).is_some());
    }

    #[test]
    fn mapping_json_keeps_the_reading_time() {
        let s = Sample::from_local(br#"{"value":3.5,"unit":"kW","ts":1700000000123}"#, 7).unwrap();
        assert_eq!(s, Sample::new(json!(3.5), 1700000000123));
        // Other objects are values in their own right.
        let s = Sample::from_local(br#"{"value":1,"ts":5,"other":2}"#, 7).unwrap();
        assert_eq!(s.value, json!({"value":1,"ts":5,"other":2}));
        assert_eq!(s.time, 7);
    }

    #[test]
    fn a_window_opens_with_the_first_sample() {
        let t0 = Instant::now();
        let mut b = Batcher::new(Duration::from_secs(1), 100);
        assert_eq!(b.due(), None);
        b.push("power", Sample::new(json!(1), 10), t0);
        b.push(
            "power",
            Sample::new(json!(2), 20),
            t0 + Duration::from_millis(300),
        );
        b.push(
            "temp",
            Sample::new(json!(5), 15),
            t0 + Duration::from_millis(600),
        );
        assert_eq!(b.due(), Some(t0 + Duration::from_secs(1)));
        let batch = b.take();
        assert!(b.is_empty() && b.due().is_none());
        assert_eq!(batch["power"].len(), 2);
        let latest = latest(&batch);
        assert_eq!(latest["power"], &Sample::new(json!(2), 20));
        assert_eq!(latest["temp"].time, 15);
    }

    #[test]
    fn latest_is_by_time_not_arrival() {
        let mut b = Batcher::new(Duration::from_secs(1), 100);
        let now = Instant::now();
        b.push("p", Sample::new(json!("new"), 20), now);
        b.push("p", Sample::new(json!("old"), 10), now);
        assert_eq!(latest(&b.take())["p"].value, json!("new"));
    }

    #[test]
    fn samples_per_property_are_bounded() {
        let mut b = Batcher::new(Duration::from_secs(1), 3);
        let now = Instant::now();
        for i in 0..10 {
            b.push("p", Sample::new(json!(i), i), now);
        }
        assert_eq!(b.superseded(), 7);
        let batch = b.take();
        assert_eq!(
            batch["p"].iter().map(|s| s.time).collect::<Vec<_>>(),
            [7, 8, 9]
        );
    }
}

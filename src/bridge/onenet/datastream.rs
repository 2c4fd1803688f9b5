//! Payloads of older data-stream products (`mode: datastream`): data points
//! on `dp/post/json`, commands on `cmd/request/{id}`.

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::batch::Batch;

/// Data-point message ids: an int32 greater than 0.
#[derive(Debug, Clone)]
pub struct DpIdCounter {
    next: i32,
}

impl Default for DpIdCounter {
    fn default() -> Self {
        DpIdCounter { next: 1 }
    }
}

impl DpIdCounter {
    pub fn next_id(&mut self) -> i32 {
        let id = self.next;
        self.next = if id == i32::MAX { 1 } else { id + 1 };
        id
    }
}

/// `{"id":n,"dp":{"<stream>":[{"v":…,"t":<seconds>}, …]}}`: every sample of
/// the window, oldest first (a stream takes several points per message).
pub fn dp_post(id: i32, batch: &Batch) -> Option<Vec<u8>> {
    let dp: Map<String, Json> = batch
        .iter()
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(stream, samples)| {
            let mut points: Vec<_> = samples.iter().collect();
            points.sort_by_key(|s| s.time);
            let points: Vec<Json> = points
                .into_iter()
                .map(|s| json!({"v": s.value, "t": s.time.div_euclid(1000)}))
                .collect();
            (stream.clone(), Json::Array(points))
        })
        .collect();
    if dp.is_empty() {
        return None;
    }
    serde_json::to_vec(&json!({"id": id, "dp": dp})).ok()
}

/// `dp/post/json/rejected`: `{"id":…,"err_code":…,"err_msg":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DpRejected {
    pub id: i64,
    #[serde(default)]
    pub err_code: i64,
    #[serde(default)]
    pub err_msg: String,
}

impl DpRejected {
    pub fn parse(payload: &[u8]) -> Result<DpRejected, String> {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }
}

/// A command response is limited to under 1 KB; longer ones are cut at a
/// character boundary.
pub fn cmd_response(text: &[u8]) -> Vec<u8> {
    const LIMIT: usize = 1023;
    if text.len() <= LIMIT {
        return text.to_vec();
    }
    let s = String::from_utf8_lossy(text);
    let mut end = LIMIT.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::super::batch::Sample;
    use super::*;

    #[test]
    fn dp_posts_keep_every_point_in_seconds() {
        let mut batch = Batch::new();
        batch.insert(
            "temp".into(),
            vec![
                Sample::new(json!(21.5), 1_552_289_677_900),
                Sample::new(json!(21.0), 1_552_289_676_100),
            ],
        );
        batch.insert("msg".into(), vec![Sample::new(json!("hi"), 5_000)]);
        let got: Json = serde_json::from_slice(&dp_post(3, &batch).unwrap()).unwrap();
        assert_eq!(
            got,
            json!({"id":3,"dp":{
                "temp":[{"v":21.0,"t":1552289676},{"v":21.5,"t":1552289677}],
                "msg":[{"v":"hi","t":5}]}})
        );
        assert!(dp_post(1, &Batch::new()).is_none());
    }

    #[test]
    fn dp_ids_stay_positive_int32() {
        let mut ids = DpIdCounter { next: i32::MAX };
        assert_eq!(ids.next_id(), i32::MAX);
        assert_eq!(ids.next_id(), 1);
    }

    #[test]
    fn rejections_parse_and_responses_are_bounded() {
        let r = DpRejected::parse(br#"{"id":123,"err_code":98,"err_msg":"Illegal Data"}"#).unwrap();
        assert_eq!(
            (r.id, r.err_code, r.err_msg.as_str()),
            (123, 98, "Illegal Data")
        );
        assert_eq!(cmd_response(b"ok"), b"ok");
        let long = "é".repeat(600);
        let cut = cmd_response(long.as_bytes());
        assert!(cut.len() < 1024);
        assert!(std::str::from_utf8(&cut).is_ok());
    }
}

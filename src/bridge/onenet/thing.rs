//! OneJSON payloads of the thing model: property posts, replies, property
//! set requests and their replies.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::batch::{latest, Batch};
use crate::model::Millis;

/// Reply code OneNET uses for success, and that we send when every write
/// of a property set succeeded.
pub const CODE_OK: i64 = 200;
/// A property set whose request could not be understood.
pub const CODE_BAD_REQUEST: i64 = 400;
/// A property set for which at least one device write failed.
pub const CODE_WRITE_FAILED: i64 = 500;
/// A property set for which no handler answered in time.
pub const CODE_TIMEOUT: i64 = 504;

/// The largest message id OneNET accepts has 13 digits.
const MAX_ID: u64 = 9_999_999_999_999;

/// Message ids: decimal, 1..=9999999999999, then back to 1.
#[derive(Debug, Clone)]
pub struct IdCounter {
    next: u64,
}

impl Default for IdCounter {
    fn default() -> Self {
        IdCounter::starting_at(1)
    }
}

impl IdCounter {
    pub fn starting_at(n: u64) -> IdCounter {
        IdCounter {
            next: n.clamp(1, MAX_ID),
        }
    }

    pub fn next_id(&mut self) -> String {
        let id = self.next;
        self.next = if id >= MAX_ID { 1 } else { id + 1 };
        id.to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedValue {
    pub value: Json,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Millis>,
}

/// `thing/property/post` (and the request half of `thing/property/set`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertyPost {
    pub id: String,
    #[serde(default = "version")]
    pub version: String,
    pub params: Map<String, Json>,
}

fn version() -> String {
    "1.0".to_string()
}

impl PropertyPost {
    /// One post with the latest sample of each property in `batch`, each
    /// with its own `time`. `None` if the batch is empty.
    pub fn from_batch(id: String, batch: &Batch) -> Option<PropertyPost> {
        let params: Map<String, Json> = latest(batch)
            .into_iter()
            .map(|(k, s)| {
                let v = TimedValue {
                    value: s.value.clone(),
                    time: Some(s.time),
                };
                (k.to_string(), serde_json::to_value(v).unwrap_or(Json::Null))
            })
            .collect();
        if params.is_empty() {
            return None;
        }
        Some(PropertyPost {
            id,
            version: version(),
            params,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and JSON values cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(payload: &[u8]) -> Result<PropertyPost, String> {
        let post: PropertyPost = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        check_id(&post.id)?;
        Ok(post)
    }

    /// The property names in this post.
    pub fn properties(&self) -> impl Iterator<Item = &str> {
        self.params.keys().map(String::as_str)
    }

    /// Each property's `(value, time)`, for posts built by [`from_batch`].
    ///
    /// [`from_batch`]: PropertyPost::from_batch
    pub fn values(&self) -> Vec<(String, TimedValue)> {
        self.params
            .iter()
            .filter_map(|(k, v)| {
                serde_json::from_value::<TimedValue>(v.clone())
                    .ok()
                    .map(|tv| (k.clone(), tv))
            })
            .collect()
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 13 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("id `{id}` is not 1 to 13 decimal digits"));
    }
    Ok(())
}

/// A reply: `{"id":"…","code":200,"msg":"…"}` (`post/reply`, `set_reply`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(deserialize_with = "id_string")]
    pub id: String,
    pub code: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Json>,
}

/// Ids are strings in OneJSON; accept numbers too.
fn id_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Json::deserialize(d)? {
        Json::String(s) => Ok(s),
        Json::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "id {other} is not a string"
        ))),
    }
}

impl Reply {
    pub fn new(id: impl Into<String>, code: i64, msg: impl Into<String>) -> Reply {
        Reply {
            id: id.into(),
            code,
            msg: Some(msg.into()),
            data: None,
        }
    }

    pub fn parse(payload: &[u8]) -> Result<Reply, String> {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn is_ok(&self) -> bool {
        self.code == CODE_OK
    }
}

/// A platform request's JSON and its `id` (a string or a number).
fn request(payload: &[u8]) -> Result<(Json, String), (Option<String>, String)> {
    let json: Json =
        serde_json::from_slice(payload).map_err(|e| (None, format!("not JSON: {e}")))?;
    let id = match json.get("id") {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Number(n)) => n.to_string(),
        _ => return Err((None, "no `id`".to_string())),
    };
    Ok((json, id))
}

/// A `thing/property/set` request: property -> value to set.
#[derive(Debug, Clone, PartialEq)]
pub struct PropertySet {
    pub id: String,
    pub params: Vec<(String, Json)>,
}

impl PropertySet {
    /// Parses a request. An error carries the id when it could be read, so
    /// that a reply can still be sent.
    pub fn parse(payload: &[u8]) -> Result<PropertySet, (Option<String>, String)> {
        let (json, id) = request(payload)?;
        let Some(Json::Object(params)) = json.get("params") else {
            return Err((Some(id), "`params` is not an object".to_string()));
        };
        if params.is_empty() {
            return Err((Some(id), "`params` is empty".to_string()));
        }
        Ok(PropertySet {
            id,
            params: params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let params: Map<String, Json> = self.params.iter().cloned().collect();
        serde_json::to_vec(&serde_json::json!({
            "id": self.id,
            "version": "1.0",
            "params": params,
        }))
        .unwrap_or_default()
    }
}

/// `thing/history/post`: the values of several queued posts in one
/// message, each with its own time, for draining a backlog faster than one
/// post per second allows. Returns the payload and the properties it
/// carries.
pub fn history_post(id: &str, posts: &[PropertyPost]) -> (Vec<u8>, Vec<String>) {
    let mut props: std::collections::BTreeMap<String, Vec<TimedValue>> = Default::default();
    for post in posts {
        for (k, v) in post.values() {
            props.entry(k).or_default().push(v);
        }
    }
    for values in props.values_mut() {
        values.sort_by_key(|v| v.time);
    }
    let names = props.keys().cloned().collect();
    let payload = serde_json::to_vec(&serde_json::json!({
        "id": id,
        "version": "1.0",
        "params": [{ "properties": props }],
    }))
    .unwrap_or_default();
    (payload, names)
}

/// A `thing/property/get` request: the identifiers asked for (all when
/// `params` is empty or missing).
#[derive(Debug, Clone, PartialEq)]
pub struct PropertyGet {
    pub id: String,
    pub params: Vec<String>,
}

impl PropertyGet {
    pub fn parse(payload: &[u8]) -> Result<PropertyGet, (Option<String>, String)> {
        let (json, id) = request(payload)?;
        let params = match json.get("params") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    (
                        Some(id.clone()),
                        "`params` must list identifiers".to_string(),
                    )
                })?,
            Some(_) => return Err((Some(id), "`params` must list identifiers".to_string())),
        };
        Ok(PropertyGet { id, params })
    }
}

/// A value from a set request as a local payload: strings bare (`on`,
/// `30.5`), everything else as JSON (`true`, `12`, `{"a":1}`), so that
/// `commands:` parse it like any other local command.
pub fn local_payload(value: &Json) -> Vec<u8> {
    match value {
        Json::String(s) => s.as_bytes().to_vec(),
        other => other.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::batch::Sample;
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_decimal_and_at_most_13_digits() {
        let mut ids = IdCounter::default();
        assert_eq!(ids.next_id(), "1");
        assert_eq!(ids.next_id(), "2");
        let mut ids = IdCounter::starting_at(MAX_ID);
        assert_eq!(ids.next_id(), "9999999999999");
        assert_eq!(ids.next_id(), "1");
    }

    #[test]
    fn a_post_carries_each_latest_value_with_its_time() {
        let mut batch = Batch::new();
        batch.insert(
            "power".into(),
            vec![Sample::new(json!(1.5), 1000), Sample::new(json!(2.5), 1500)],
        );
        batch.insert("on".into(), vec![Sample::new(json!(true), 1200)]);
        batch.insert("cfg".into(), vec![Sample::new(json!({"a":1}), 1300)]);
        let post = PropertyPost::from_batch("7".into(), &batch).unwrap();
        let got: Json = serde_json::from_slice(&post.to_bytes()).unwrap();
        assert_eq!(
            got,
            json!({"id":"7","version":"1.0","params":{
                "power":{"value":2.5,"time":1500},
                "on":{"value":true,"time":1200},
                "cfg":{"value":{"a":1},"time":1300}}})
        );
        let back = PropertyPost::parse(&post.to_bytes()).unwrap();
        assert_eq!(back, post);
        assert_eq!(
            back.properties().collect::<Vec<_>>(),
            ["cfg", "on", "power"]
        );
        assert_eq!(back.values()[2].1.time, Some(1500));
        assert!(PropertyPost::from_batch("1".into(), &Batch::new()).is_none());
    }

    #[test]
    fn post_ids_are_checked() {
        assert!(PropertyPost::parse(br#"{"id":"12345678901234","params":{}}"#).is_err());
        assert!(PropertyPost::parse(br#"{"id":"abc","params":{}}"#).is_err());
        assert!(PropertyPost::parse(br#"{"id":"1","params":{}}"#).is_ok());
    }

    #[test]
    fn replies_parse_and_build() {
        let r = Reply::parse(br#"{"id":"12","code":2404,"msg":"identifier not exist"}"#).unwrap();
        assert_eq!((r.id.as_str(), r.code, r.is_ok()), ("12", 2404, false));
        assert_eq!(r.msg.as_deref(), Some("identifier not exist"));
        assert!(Reply::parse(br#"{"id":12,"code":200}"#).unwrap().is_ok());
        assert!(Reply::parse(b"nope").is_err());
        let out: Json =
            serde_json::from_slice(&Reply::new("5", 200, "success").to_bytes()).unwrap();
        assert_eq!(out, json!({"id":"5","code":200,"msg":"success"}));
    }

    #[test]
    fn history_posts_merge_queued_posts_with_their_times() {
        let post = |id: &str, v: i64, t: i64| {
            let mut b = Batch::new();
            b.insert("p".into(), vec![Sample::new(json!(v), t)]);
            PropertyPost::from_batch(id.into(), &b).unwrap()
        };
        let (payload, names) = history_post("9", &[post("1", 10, 1000), post("2", 20, 2000)]);
        let j: Json = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            j,
            json!({"id":"9","version":"1.0","params":[{"properties":{"p":[
                {"value":10,"time":1000},{"value":20,"time":2000}]}}]})
        );
        assert_eq!(names, ["p"]);
    }

    #[test]
    fn property_get_requests_parse() {
        let g =
            PropertyGet::parse(br#"{"id":"4","version":"1.0","params":["power","on"]}"#).unwrap();
        assert_eq!((g.id.as_str(), g.params.len()), ("4", 2));
        assert!(PropertyGet::parse(br#"{"id":"5"}"#)
            .unwrap()
            .params
            .is_empty());
        assert_eq!(
            PropertyGet::parse(br#"{"id":"6","params":[1]}"#)
                .unwrap_err()
                .0
                .as_deref(),
            Some("6")
        );
        let mut r = Reply::new("4", 200, "success");
        r.data = Some(json!({"power": 2.5}));
        let out: Json = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(
            out,
            json!({"id":"4","code":200,"msg":"success","data":{"power":2.5}})
        );
    }

    #[test]
    fn property_set_requests_parse() {
        let s = PropertySet::parse(
            br#"{"id":"9","version":"1.0","params":{"led":true,"temp":"30.5"}}"#,
        )
        .unwrap();
        assert_eq!(s.id, "9");
        assert_eq!(
            s.params,
            vec![("led".into(), json!(true)), ("temp".into(), json!("30.5"))]
        );
        assert_eq!(PropertySet::parse(&s.to_bytes()).unwrap(), s);
        assert_eq!(
            PropertySet::parse(br#"{"id":"3","params":5}"#)
                .unwrap_err()
                .0
                .as_deref(),
            Some("3")
        );
        assert_eq!(PropertySet::parse(b"{").unwrap_err().0, None);
        assert_eq!(local_payload(&json!("on")), b"on");
        assert_eq!(local_payload(&json!(true)), b"true");
        assert_eq!(local_payload(&json!(12.5)), b"12.5");
    }
}

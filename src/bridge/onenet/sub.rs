//! Sub-devices: OneNET devices the gateway reports for. Each is added to
//! the gateway's topology (`thing/sub/topo/add`, signed with the
//! sub-device's own token), logged in (`thing/sub/login`), and its
//! properties go out in `thing/pack/post` messages of at most 10
//! sub-devices and 100 properties per sub-device.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{json, Map, Value as Json};

use super::batch::{latest, Batch};
use super::thing::IdCounter;
use super::token::{self, AccessKey, TokenError};
use crate::config::{SignMethod, SubDeviceConfig};

/// Sub-devices per `pack/post` message, at most.
pub const MAX_DEVICES_PER_PACK: usize = 10;
/// Properties per sub-device in one `pack/post`, at most.
pub const MAX_POINTS_PER_DEVICE: usize = 100;

/// Which OneNET device a value belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Identity {
    pub product_id: String,
    pub device_name: String,
}

impl Identity {
    pub fn of(sd: &SubDeviceConfig) -> Identity {
        Identity {
            product_id: sd.product_id.clone(),
            device_name: sd.device_name.clone(),
        }
    }

    fn json(&self) -> Json {
        json!({"productID": self.product_id, "deviceName": self.device_name})
    }

    /// `product/device`, for logs and counters.
    pub fn label(&self) -> String {
        format!("{}/{}", self.product_id, self.device_name)
    }
}

fn message(id: &str, params: Json) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "version": "1.0", "params": params})).unwrap_or_default()
}

/// `thing/sub/topo/add`: adds the sub-device, proven by its own token.
pub fn topo_add(
    id: &str,
    sd: &SubDeviceConfig,
    gateway_method: SignMethod,
    now: SystemTime,
    ttl: std::time::Duration,
) -> Result<Vec<u8>, TokenError> {
    let key = AccessKey::from_base64(&sd.access_key)?;
    let res = token::device_resource(&sd.product_id, &sd.device_name);
    let sas = token::token(
        &key,
        sd.method.unwrap_or(gateway_method),
        &res,
        token::expiry(now, ttl),
    );
    let mut params = Identity::of(sd).json();
    params["sasToken"] = Json::String(sas);
    Ok(message(id, params))
}

/// `thing/sub/login`.
pub fn login(id: &str, who: &Identity) -> Vec<u8> {
    message(id, who.json())
}

/// One `pack/post` message: its id, payload, and the `product/device/prop`
/// labels it carries (for counting rejections).
#[derive(Debug, Clone, PartialEq)]
pub struct Pack {
    pub id: String,
    pub payload: Vec<u8>,
    pub labels: Vec<String>,
}

/// The latest sample of each property of each sub-device, split into
/// `pack/post` messages within OneNET's limits.
pub fn pack_posts(ids: &mut IdCounter, devices: &BTreeMap<Identity, Batch>) -> Vec<Pack> {
    // Entries of at most MAX_POINTS_PER_DEVICE properties each.
    let mut entries: Vec<(Json, Vec<String>)> = Vec::new();
    for (who, batch) in devices {
        let values: Vec<_> = latest(batch).into_iter().collect();
        for chunk in values.chunks(MAX_POINTS_PER_DEVICE) {
            let mut props = Map::new();
            let mut labels = Vec::new();
            for (prop, s) in chunk {
                props.insert(prop.to_string(), json!({"value": s.value, "time": s.time}));
                labels.push(format!("{}/{prop}", who.label()));
            }
            entries.push((
                json!({"identity": who.json(), "properties": props, "events": {}}),
                labels,
            ));
        }
    }
    // A device split over several entries must not appear twice in one
    // message, so split messages by entry count and by identity.
    let mut packs = Vec::new();
    let mut current: Vec<Json> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut seen: Vec<Json> = Vec::new();
    for (entry, entry_labels) in entries {
        let identity = entry["identity"].clone();
        if current.len() == MAX_DEVICES_PER_PACK || seen.contains(&identity) {
            let id = ids.next_id();
            packs.push(Pack {
                payload: message(&id, Json::Array(std::mem::take(&mut current))),
                id,
                labels: std::mem::take(&mut labels),
            });
            seen.clear();
        }
        seen.push(identity);
        current.push(entry);
        labels.extend(entry_labels);
    }
    if !current.is_empty() {
        let id = ids.next_id();
        packs.push(Pack {
            payload: message(&id, Json::Array(current)),
            id,
            labels,
        });
    }
    packs
}

/// The sub-devices a `pack/post` payload carries.
pub fn pack_identities(payload: &[u8]) -> Vec<Identity> {
    let Ok(j) = serde_json::from_slice::<Json>(payload) else {
        return Vec::new();
    };
    j["params"]
        .as_array()
        .into_iter()
        .flatten()
        .map(identity_of)
        .collect()
}

/// The `identity` of one entry of a sub-device message's `params`.
fn identity_of(e: &Json) -> Identity {
    let field = |k: &str| e["identity"][k].as_str().unwrap_or("").to_string();
    Identity {
        product_id: field("productID"),
        device_name: field("deviceName"),
    }
}

/// `thing/history/post` with the values of several queued `pack/post`
/// messages, one entry per sub-device, each value with its own time.
/// Returns the payload and its `product/device/prop` labels.
pub fn history_from_packs(id: &str, packs: &[&[u8]]) -> (Vec<u8>, Vec<String>) {
    let mut devices: BTreeMap<Identity, BTreeMap<String, Vec<Json>>> = BTreeMap::new();
    for payload in packs {
        let Ok(j) = serde_json::from_slice::<Json>(payload) else {
            continue;
        };
        for e in j["params"].as_array().into_iter().flatten() {
            let who = identity_of(e);
            let props = devices.entry(who).or_default();
            for (k, v) in e["properties"].as_object().into_iter().flatten() {
                props.entry(k.clone()).or_default().push(v.clone());
            }
        }
    }
    let mut labels = Vec::new();
    let params: Vec<Json> = devices
        .into_iter()
        .map(|(who, mut props)| {
            for (k, values) in props.iter_mut() {
                values.sort_by_key(|v| v["time"].as_i64().unwrap_or(0));
                labels.push(format!("{}/{k}", who.label()));
            }
            json!({"identity": who.json(), "properties": props})
        })
        .collect();
    (message(id, Json::Array(params)), labels)
}

/// The id of a `pack/post` payload and its `product/device/prop` labels.
pub fn pack_labels(payload: &[u8]) -> Option<(String, Vec<String>)> {
    let j: Json = serde_json::from_slice(payload).ok()?;
    let id = j.get("id")?.as_str()?.to_string();
    let mut labels = Vec::new();
    for e in j.get("params")?.as_array()? {
        let who = format!(
            "{}/{}",
            e["identity"]["productID"].as_str().unwrap_or(""),
            e["identity"]["deviceName"].as_str().unwrap_or("")
        );
        if let Some(props) = e["properties"].as_object() {
            labels.extend(props.keys().map(|k| format!("{who}/{k}")));
        }
    }
    Some((id, labels))
}

#[cfg(test)]
mod tests {
    use super::super::batch::Sample;
    use super::super::token::ParsedToken;
    use super::*;
    use crate::config::Secret;
    use std::time::{Duration, UNIX_EPOCH};

    const KEY: &str = "KuF3NT/jUBJ62LNBB/A8XZA9CqS3Cu79B/ABmfA1UCw=";

    fn sub(name: &str) -> SubDeviceConfig {
        SubDeviceConfig {
            product_id: "123123".into(),
            device_name: name.into(),
            access_key: Secret::new(KEY),
            method: Some(SignMethod::Sha1),
            properties: Vec::new(),
        }
    }

    fn who(n: usize) -> Identity {
        Identity {
            product_id: "p".into(),
            device_name: format!("d{n:02}"),
        }
    }

    #[test]
    fn topo_add_carries_the_sub_devices_own_token() {
        let now = UNIX_EPOCH + Duration::from_secs(1537255423);
        let msg = topo_add(
            "5",
            &sub("mydev"),
            SignMethod::Sha256,
            now,
            Duration::from_secs(100),
        )
        .unwrap();
        let j: Json = serde_json::from_slice(&msg).unwrap();
        assert_eq!(j["id"], "5");
        assert_eq!(j["params"]["productID"], "123123");
        assert_eq!(j["params"]["deviceName"], "mydev");
        let t = ParsedToken::parse(j["params"]["sasToken"].as_str().unwrap()).unwrap();
        assert_eq!(t.sign, "p2Bv5QYrZolQCtt68923gtxRCVk=");
        let login: Json =
            serde_json::from_slice(&login("6", &Identity::of(&sub("mydev")))).unwrap();
        assert_eq!(
            login,
            json!({"id":"6","version":"1.0","params":{"productID":"123123","deviceName":"mydev"}})
        );
    }

    #[test]
    fn queued_packs_merge_into_history_per_sub_device() {
        let pack = |v: i64, t: i64| {
            let mut devices = BTreeMap::new();
            let mut b = Batch::new();
            b.insert("e".to_string(), vec![Sample::new(json!(v), t)]);
            devices.insert(who(1), b);
            pack_posts(&mut IdCounter::default(), &devices)
                .remove(0)
                .payload
        };
        let (a, b) = (pack(1, 100), pack(2, 200));
        assert_eq!(pack_identities(&a), [who(1)]);
        let (payload, labels) = history_from_packs("7", &[&a, &b]);
        let j: Json = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            j["params"],
            json!([{"identity":{"productID":"p","deviceName":"d01"},
                    "properties":{"e":[{"value":1,"time":100},{"value":2,"time":200}]}}])
        );
        assert_eq!(labels, ["p/d01/e"]);
    }

    #[test]
    fn packs_respect_onenets_limits() {
        let mut devices = BTreeMap::new();
        for n in 0..12 {
            let mut b = Batch::new();
            let props = if n == 0 { 150 } else { 1 };
            for k in 0..props {
                b.insert(
                    format!("p{k:03}"),
                    vec![Sample::new(json!(k), 1000 + k as i64)],
                );
            }
            devices.insert(who(n), b);
        }
        let mut ids = IdCounter::default();
        let packs = pack_posts(&mut ids, &devices);
        let mut total = 0;
        for pack in &packs {
            let j: Json = serde_json::from_slice(&pack.payload).unwrap();
            assert_eq!(j["id"], pack.id.as_str());
            let entries = j["params"].as_array().unwrap();
            assert!(entries.len() <= MAX_DEVICES_PER_PACK);
            let mut names: Vec<_> = entries
                .iter()
                .map(|e| e["identity"]["deviceName"].clone())
                .collect();
            names.dedup();
            assert_eq!(names.len(), entries.len(), "a device twice in one message");
            for e in entries {
                let props = e["properties"].as_object().unwrap();
                assert!(props.len() <= MAX_POINTS_PER_DEVICE);
                total += props.len();
            }
        }
        assert_eq!(total, 150 + 11);
        // d00 is split in two entries; they go to different messages.
        assert_eq!(packs.len(), 3);
        assert_eq!(packs.iter().map(|p| p.labels.len()).sum::<usize>(), 161);
        for p in &packs {
            assert_eq!(
                pack_labels(&p.payload),
                Some((p.id.clone(), p.labels.clone()))
            );
        }
        let first: Json = serde_json::from_slice(&packs[0].payload).unwrap();
        assert_eq!(
            first["params"][0]["properties"]["p000"],
            json!({"value":0,"time":1000})
        );
    }
}

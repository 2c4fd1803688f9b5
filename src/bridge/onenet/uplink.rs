//! Uplink bookkeeping: which properties each post carried, so that a
//! `post/reply` with an error is counted per property. (Pacing to OneNET's
//! rate is the engine's pacer, `min_interval`.)

use super::thing::Reply;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// A post/reply that reported a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub id: String,
    pub code: i64,
    pub msg: String,
    pub properties: Vec<String>,
}

/// Posts sent and not yet answered (bounded), and per-property counts of
/// rejections.
#[derive(Debug, Default)]
pub struct PostBook {
    sent: HashMap<String, Vec<String>>,
    order: VecDeque<String>,
    rejected: BTreeMap<String, u64>,
}

/// Posts remembered for their reply; older ones are forgotten (a reply
/// that comes this late is only logged).
const REMEMBER: usize = 1024;

impl PostBook {
    pub fn sent(&mut self, id: String, properties: Vec<String>) {
        if self.sent.insert(id.clone(), properties).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > REMEMBER {
            if let Some(old) = self.order.pop_front() {
                self.sent.remove(&old);
            }
        }
    }

    /// A reply arrived. Returns the rejection if its code is not 200.
    pub fn reply(&mut self, reply: &Reply) -> Option<Rejection> {
        let properties = self.sent.remove(&reply.id).unwrap_or_default();
        if reply.is_ok() {
            return None;
        }
        for p in &properties {
            *self.rejected.entry(p.clone()).or_default() += 1;
        }
        Some(Rejection {
            id: reply.id.clone(),
            code: reply.code,
            msg: reply.msg.clone().unwrap_or_default(),
            properties,
        })
    }

    /// Rejected posts per property since start.
    pub fn rejected(&self) -> &BTreeMap<String, u64> {
        &self.rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_per_property() {
        let mut b = PostBook::default();
        b.sent("1".into(), vec!["power".into(), "nope".into()]);
        b.sent("2".into(), vec!["power".into()]);
        assert_eq!(b.reply(&Reply::new("2", 200, "success")), None);
        let r = b
            .reply(&Reply::new("1", 2404, "identifier not exist"))
            .unwrap();
        assert_eq!(r.properties, ["power", "nope"]);
        assert_eq!(r.msg, "identifier not exist");
        assert_eq!(b.rejected().get("nope"), Some(&1));
        // Unknown ids still yield the rejection, without properties.
        assert!(b
            .reply(&Reply::new("99", 500, "x"))
            .unwrap()
            .properties
            .is_empty());
    }

    #[test]
    fn the_book_is_bounded() {
        let mut b = PostBook::default();
        for i in 0..(REMEMBER + 10) {
            b.sent(i.to_string(), vec!["p".into()]);
        }
        assert_eq!(b.sent.len(), REMEMBER);
        assert!(!b.sent.contains_key("0"));
    }
}

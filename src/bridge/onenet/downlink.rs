//! Bookkeeping for requests from OneNET that must be answered: a property
//! set is answered once every property it touches has a result from a local
//! handler (`commands:` or a rule), or when the reply timeout passes. OneNET
//! allows about one property set per second, so requests are handled one
//! at a time, in order; results carry only the property name, and handling
//! one request at a time keeps them unambiguous.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::thing::{Reply, CODE_OK, CODE_TIMEOUT, CODE_WRITE_FAILED};

/// A request being answered: `id`, and the result of each key so far.
#[derive(Debug)]
struct Pending {
    id: String,
    results: BTreeMap<String, Option<Result<(), String>>>,
    deadline: Instant,
}

/// What to do next with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Publish each `(key, value)` locally for the handlers.
    Dispatch {
        id: String,
        params: Vec<(String, Json)>,
    },
    /// Send this answer to OneNET.
    Answer(Answer),
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub id: String,
    pub code: i64,
    pub msg: String,
}

impl Answer {
    pub fn reply(&self) -> Reply {
        Reply::new(self.id.clone(), self.code, self.msg.clone())
    }
}

/// Requests from OneNET waiting for local results; one in progress at a
/// time, the others queued (bounded: OneNET sends at most one per second).
#[derive(Debug)]
pub struct Requests {
    timeout: Duration,
    current: Option<Pending>,
    waiting: VecDeque<(String, Vec<(String, Json)>)>,
    max_waiting: usize,
}

impl Requests {
    pub fn new(timeout: Duration) -> Requests {
        Requests {
            timeout,
            current: None,
            waiting: VecDeque::new(),
            max_waiting: 32,
        }
    }

    /// A new request. Returns what to do now: dispatch it, or nothing if it
    /// waits its turn; an answer right away if too many are waiting.
    pub fn request(&mut self, id: String, params: Vec<(String, Json)>, now: Instant) -> Vec<Step> {
        if self.current.is_some() {
            if self.waiting.len() >= self.max_waiting {
                return vec![Step::Answer(Answer {
                    id,
                    code: CODE_TIMEOUT,
                    msg: "gateway busy: too many property sets waiting".into(),
                })];
            }
            self.waiting.push_back((id, params));
            return Vec::new();
        }
        self.start(id, params, now)
    }

    fn start(&mut self, id: String, params: Vec<(String, Json)>, now: Instant) -> Vec<Step> {
        self.current = Some(Pending {
            id: id.clone(),
            results: params.iter().map(|(k, _)| (k.clone(), None)).collect(),
            deadline: now + self.timeout,
        });
        vec![Step::Dispatch { id, params }]
    }

    /// A local handler reported the result for `key`. Returns the answer
    /// (and the next request's dispatch) when the current request is done.
    pub fn result(&mut self, key: &str, result: Result<(), String>, now: Instant) -> Vec<Step> {
        let Some(p) = self.current.as_mut() else {
            return Vec::new();
        };
        match p.results.get_mut(key) {
            // The first result for a key counts; a rule and a command may
            // both answer.
            Some(slot @ None) => *slot = Some(result),
            _ => return Vec::new(),
        }
        if p.results.values().all(Option::is_some) {
            return self.finish(now);
        }
        Vec::new()
    }

    /// When the current request times out, if there is one.
    pub fn deadline(&self) -> Option<Instant> {
        self.current.as_ref().map(|p| p.deadline)
    }

    /// Answers the current request if its deadline has passed.
    pub fn tick(&mut self, now: Instant) -> Vec<Step> {
        match &self.current {
            Some(p) if now >= p.deadline => self.finish(now),
            _ => Vec::new(),
        }
    }

    fn finish(&mut self, now: Instant) -> Vec<Step> {
        let Some(p) = self.current.take() else {
            return Vec::new();
        };
        let mut steps = vec![Step::Answer(answer(p))];
        if let Some((id, params)) = self.waiting.pop_front() {
            steps.extend(self.start(id, params, now));
        }
        steps
    }
}

fn answer(p: Pending) -> Answer {
    let failed: Vec<String> = p
        .results
        .iter()
        .filter_map(|(k, r)| match r {
            Some(Err(e)) => Some(format!("{k}: {e}")),
            _ => None,
        })
        .collect();
    let unanswered: Vec<&str> = p
        .results
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(k, _)| k.as_str())
        .collect();
    if !failed.is_empty() {
        let mut msg = failed.join("; ");
        if !unanswered.is_empty() {
            msg.push_str(&format!("; no answer for {}", unanswered.join(", ")));
        }
        Answer {
            id: p.id,
            code: CODE_WRITE_FAILED,
            msg,
        }
    } else if !unanswered.is_empty() {
        Answer {
            id: p.id,
            code: CODE_TIMEOUT,
            msg: format!("timeout: no answer for {}", unanswered.join(", ")),
        }
    } else {
        Answer {
            id: p.id,
            code: CODE_OK,
            msg: "success".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(keys: &[&str]) -> Vec<(String, Json)> {
        keys.iter().map(|k| (k.to_string(), json!(1))).collect()
    }

    fn answers(steps: &[Step]) -> Vec<(String, i64)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Answer(a) => Some((a.id.clone(), a.code)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn all_results_ok_answers_200() {
        let t0 = Instant::now();
        let mut r = Requests::new(Duration::from_secs(5));
        let steps = r.request("1".into(), params(&["led", "speed"]), t0);
        assert!(matches!(&steps[..], [Step::Dispatch { id, .. }] if id == "1"));
        assert!(r.result("led", Ok(()), t0).is_empty());
        let steps = r.result("speed", Ok(()), t0);
        assert_eq!(answers(&steps), [("1".to_string(), 200)]);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_failed_write_answers_an_error_with_the_reason() {
        let t0 = Instant::now();
        let mut r = Requests::new(Duration::from_secs(5));
        r.request("1".into(), params(&["led", "speed"]), t0);
        r.result("led", Err("illegal data address".into()), t0);
        let steps = r.result("speed", Ok(()), t0);
        let Step::Answer(a) = &steps[0] else { panic!() };
        assert_eq!(a.code, CODE_WRITE_FAILED);
        assert_eq!(a.msg, "led: illegal data address");
    }

    #[test]
    fn no_handler_answers_a_timeout_and_the_next_request_starts() {
        let t0 = Instant::now();
        let mut r = Requests::new(Duration::from_secs(5));
        r.request("1".into(), params(&["led"]), t0);
        assert!(r.request("2".into(), params(&["fan"]), t0).is_empty());
        // Results for keys of other requests are ignored.
        assert!(r.result("fan", Ok(()), t0).is_empty());
        assert!(r.tick(t0 + Duration::from_secs(4)).is_empty());
        let steps = r.tick(t0 + Duration::from_secs(5));
        assert_eq!(answers(&steps), [("1".to_string(), CODE_TIMEOUT)]);
        assert!(matches!(&steps[1], Step::Dispatch { id, .. } if id == "2"));
        let Step::Answer(a) = &steps[0] else { panic!() };
        assert_eq!(a.msg, "timeout: no answer for led");
        let steps = r.result("fan", Ok(()), t0 + Duration::from_secs(6));
        assert_eq!(answers(&steps), [("2".to_string(), 200)]);
    }

    #[test]
    fn the_waiting_line_is_bounded() {
        let t0 = Instant::now();
        let mut r = Requests::new(Duration::from_secs(5));
        r.request("0".into(), params(&["a"]), t0);
        for i in 1..=32 {
            assert!(r.request(i.to_string(), params(&["a"]), t0).is_empty());
        }
        let steps = r.request("33".into(), params(&["a"]), t0);
        assert_eq!(answers(&steps), [("33".to_string(), CODE_TIMEOUT)]);
    }
}

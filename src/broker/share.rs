//! MQTT 5 shared subscriptions (`$share/<group>/<filter>`): each message
//! goes to one member of the group, in turn, preferring members that are
//! online. rmqtt routes them; it only asks which member gets the message.

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::subscribe::SharedSubscription;
use rmqtt::types::{
    ClientId, Id, IsOnline, NodeId, SharedGroup, SubscriptionIdentifier, SubscriptionOptions,
    TopicName,
};

#[derive(Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

type Member = (
    NodeId,
    ClientId,
    SubscriptionOptions,
    Option<Vec<SubscriptionIdentifier>>,
    Option<IsOnline>,
);

#[async_trait]
impl SharedSubscription for RoundRobin {
    fn is_supported(&self) -> bool {
        true
    }

    async fn choice(
        &self,
        _scx: &ServerContext,
        _group: &SharedGroup,
        _publisher: &Id,
        _topic: &TopicName,
        members: &[Member],
    ) -> Option<(usize, IsOnline)> {
        pick(
            self.next.fetch_add(1, Ordering::Relaxed),
            members.iter().map(|m| m.4),
        )
    }
}

/// The member for turn `turn`: the next online one from there on, or, with
/// none online, the turn's own (its session queues the message).
fn pick(
    turn: usize,
    online: impl ExactSizeIterator<Item = Option<IsOnline>> + Clone,
) -> Option<(usize, IsOnline)> {
    let n = online.len();
    if n == 0 {
        return None;
    }
    let states: Vec<bool> = online.map(|o| o.unwrap_or(true)).collect();
    (0..n)
        .map(|k| (turn + k) % n)
        .find(|&i| states[i])
        .map(|i| (i, true))
        .or(Some((turn % n, false)))
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn takes_turns_among_online_members() {
        let all = [Some(true), Some(true), Some(true)];
        let chosen: Vec<usize> = (0..6)
            .map(|t| pick(t, all.iter().copied()).unwrap().0)
            .collect();
        assert_eq!(chosen, [0, 1, 2, 0, 1, 2]);
        let one_off = [Some(true), Some(false), Some(true)];
        assert_eq!(pick(1, one_off.iter().copied()), Some((2, true)));
        let none = [Some(false), Some(false)];
        assert_eq!(pick(3, none.iter().copied()), Some((1, false)));
        assert_eq!(pick(0, [].iter().copied()), None);
    }
}

//! rmqtt's subscription router with its changes made one at a time.
//!
//! rmqtt's `DefaultRouter::remove` takes the last subscriber off a topic
//! filter, lets go of the map entry, and then deletes the whole filter
//! because it *was* empty. A client subscribing to the same filter in that
//! moment (a LAN client reconnecting just as another subscriber of the same
//! topic leaves) has its subscription deleted with it: it gets its SUBACK
//! and then never a message. The fuzzing harness found it (a probe that
//! subscribed while the previous probe's session was being cleaned up never
//! got its own publish). Adds and removes are rare next to routing, so they
//! go through one lock here; routing (`matches`) is not held up.

use std::sync::Arc;

use async_trait::async_trait;
use rmqtt::context::ServerContext;
use rmqtt::router::{DefaultRouter, Router};
use rmqtt::types::{
    AllRelationsMap, HashMap, Id, NodeId, Route, SubRelationsMap, SubsSearchParams,
    SubsSearchResult, SubscriptionOptions, TopicName,
};
use rmqtt::utils::Counter;
use tokio::sync::Mutex;

pub struct SerialRouter {
    inner: DefaultRouter,
    changes: Arc<Mutex<()>>,
}

impl SerialRouter {
    pub fn new(scx: &ServerContext) -> SerialRouter {
        SerialRouter {
            inner: DefaultRouter::new(Some(scx.clone())),
            changes: Arc::new(Mutex::new(())),
        }
    }
}

#[async_trait]
impl Router for SerialRouter {
    async fn add(
        &self,
        topic_filter: &str,
        id: Id,
        opts: SubscriptionOptions,
    ) -> rmqtt::Result<()> {
        let _one_at_a_time = self.changes.lock().await;
        self.inner.add(topic_filter, id, opts).await
    }

    async fn remove(&self, topic_filter: &str, id: Id) -> rmqtt::Result<bool> {
        let _one_at_a_time = self.changes.lock().await;
        self.inner.remove(topic_filter, id).await
    }

    async fn matches(&self, id: Id, topic: &TopicName) -> rmqtt::Result<SubRelationsMap> {
        self.inner.matches(id, topic).await
    }

    async fn is_online(&self, node_id: NodeId, client_id: &str) -> bool {
        self.inner.is_online(node_id, client_id).await
    }

    async fn gets(&self, limit: usize) -> Vec<Route> {
        self.inner.gets(limit).await
    }

    async fn get(&self, topic: &str) -> rmqtt::Result<Vec<Route>> {
        self.inner.get(topic).await
    }

    async fn query_subscriptions(&self, q: &SubsSearchParams) -> Vec<SubsSearchResult> {
        self.inner.query_subscriptions(q).await
    }

    async fn topics_tree(&self) -> usize {
        self.inner.topics_tree().await
    }

    fn topics(&self) -> Counter {
        self.inner.topics()
    }

    fn routes(&self) -> Counter {
        self.inner.routes()
    }

    fn merge_topics(&self, topics_map: &HashMap<NodeId, Counter>) -> Counter {
        self.inner.merge_topics(topics_map)
    }

    fn merge_routes(&self, routes_map: &HashMap<NodeId, Counter>) -> Counter {
        self.inner.merge_routes(routes_map)
    }

    async fn list_topics(&self, top: usize) -> Vec<String> {
        self.inner.list_topics(top).await
    }

    async fn list_relations(&self, top: usize) -> Vec<serde_json::Value> {
        self.inner.list_relations(top).await
    }

    fn relations(&self) -> &AllRelationsMap {
        self.inner.relations()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Client `b` subscribes to a filter while `a`, its only other
    /// subscriber, unsubscribes: `b` must stay subscribed. Run many times
    /// on two threads, as the two connections' tasks would.
    async fn b_survives(router: Arc<dyn Router>, rounds: usize) -> usize {
        let filter = "probe/1";
        let id = |c: &str| Id::from(1, rmqtt::types::ClientId::from(c.to_string()));
        let mut lost = 0;
        for _ in 0..rounds {
            router
                .add(filter, id("a"), SubscriptionOptions::default())
                .await
                .expect("add a");
            let r = router.clone();
            let remove = tokio::spawn(async move { r.remove(filter, id("a")).await });
            let r = router.clone();
            let add = tokio::spawn(async move {
                r.add(filter, id("b"), SubscriptionOptions::default()).await
            });
            remove.await.expect("task").expect("remove a");
            add.await.expect("task").expect("add b");
            let b_there = router
                .relations()
                .get(filter)
                .is_some_and(|rels| rels.contains_key("b"));
            if !b_there {
                lost += 1;
            }
            router.remove(filter, id("b")).await.expect("remove b");
        }
        lost
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_made_while_the_last_other_one_leaves_is_kept() {
        let scx = ServerContext::new().build().await;
        let lost = b_survives(Arc::new(SerialRouter::new(&scx)), 20_000).await;
        assert_eq!(lost, 0, "subscriptions lost to a concurrent remove");
    }
}

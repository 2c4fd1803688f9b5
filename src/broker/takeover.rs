//! A client that reconnects with the same client id while its previous
//! connection is still closing (a device that drops and comes straight
//! back, or DISCONNECT followed at once by CONNECT) must get in. rmqtt asks
//! the old session to step down with a message; when that session is
//! already on its way out it drops the message, rmqtt takes the dropped
//! reply as a failure and answers the new client "server unavailable".
//! This wrapper around rmqtt's session entries asks again for a short
//! while: by then the old session is gone and the takeover goes through.

use std::time::Duration;

use async_trait::async_trait;
use rmqtt::session::Session;
use rmqtt::shared::Entry;
use rmqtt::types::{
    From, Id, IsAdmin, OfflineSession, Publish, Reason, SubsSearchResult, Subscribe,
    SubscribeReturn, Tx, Unsubscribe,
};

/// Attempts to take a session over, and the pause between them.
const ATTEMPTS: u32 = 25;
const PAUSE: Duration = Duration::from_millis(20);

pub struct Takeover(pub Box<dyn Entry>);

#[async_trait]
impl Entry for Takeover {
    async fn try_lock(&self) -> rmqtt::Result<Box<dyn Entry>> {
        Ok(Box::new(Takeover(self.0.try_lock().await?)))
    }

    fn id(&self) -> Id {
        self.0.id()
    }

    fn id_same(&self) -> Option<bool> {
        self.0.id_same()
    }

    async fn set(&mut self, session: Session, tx: Tx) -> rmqtt::Result<()> {
        self.0.set(session, tx).await
    }

    async fn remove(&mut self) -> rmqtt::Result<Option<(Session, Tx)>> {
        self.0.remove().await
    }

    async fn remove_with(&mut self, id: &Id) -> rmqtt::Result<Option<(Session, Tx)>> {
        self.0.remove_with(id).await
    }

    async fn kick(
        &mut self,
        clean_start: bool,
        clear_subscriptions: bool,
        is_admin: IsAdmin,
    ) -> rmqtt::Result<OfflineSession> {
        let mut attempt = 1;
        loop {
            match self
                .0
                .kick(clean_start, clear_subscriptions, is_admin)
                .await
            {
                Ok(o) => return Ok(o),
                Err(e) if attempt >= ATTEMPTS => return Err(e),
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "previous session still closing; asking again");
                    attempt += 1;
                    tokio::time::sleep(PAUSE).await;
                }
            }
        }
    }

    async fn online(&self) -> bool {
        self.0.online().await
    }

    async fn is_connected(&self) -> bool {
        self.0.is_connected().await
    }

    fn session(&self) -> Option<Session> {
        self.0.session()
    }

    fn exist(&self) -> bool {
        self.0.exist()
    }

    fn tx(&self) -> Option<Tx> {
        self.0.tx()
    }

    async fn subscribe(&self, subscribe: &Subscribe) -> rmqtt::Result<SubscribeReturn> {
        self.0.subscribe(subscribe).await
    }

    async fn unsubscribe(&self, unsubscribe: &Unsubscribe) -> rmqtt::Result<bool> {
        self.0.unsubscribe(unsubscribe).await
    }

    async fn publish(&self, from: From, p: Publish) -> Result<(), (From, Publish, Reason)> {
        self.0.publish(from, p).await
    }

    async fn subscriptions(&self) -> Option<Vec<SubsSearchResult>> {
        self.0.subscriptions().await
    }
}

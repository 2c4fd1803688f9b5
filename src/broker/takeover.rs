//! A client that reconnects with the same client id while its previous
//! connection is still closing (a device that drops and comes straight
//! back, or DISCONNECT followed at once by CONNECT) must get in. rmqtt asks
//! the old session to step down with a message; when that session is
//! already on its way out it drops the message, rmqtt takes the dropped
//! reply as a failure and answers the new client "server unavailable".
//! This wrapper around rmqtt's session entries asks again for a short
//! while: by then the old session is gone and the takeover goes through.
//! It is also where a login answered "busy" is stopped (`hooks.rs`).

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

pub struct Takeover {
    pub inner: Box<dyn Entry>,
    /// Connections to refuse as "server unavailable" here (see
    /// `admission.rs`): taking the entry is the first thing rmqtt does
    /// after the login hook, for MQTT 3.1.1 and 5 alike. A failure here
    /// gives the connection's slot back.
    pub admission: std::sync::Arc<super::admission::Admission>,
}

#[async_trait]
impl Entry for Takeover {
    async fn try_lock(&self) -> rmqtt::Result<Box<dyn Entry>> {
        let id = self.inner.id();
        if self.admission.take_unavailable(&id) {
            return Err(anyhow::anyhow!("server busy: the client is asked to retry"));
        }
        // Another handshake for the same client id (one that reset its
        // connection a moment ago) may still hold the id; wait for it a
        // little rather than answer "server unavailable" at once.
        let mut attempt = 1;
        let inner = loop {
            match self.inner.try_lock().await {
                Ok(locked) => break locked,
                Err(e) if attempt >= ATTEMPTS => {
                    self.admission.give_back(&id);
                    return Err(e);
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(PAUSE).await;
                }
            }
        };
        Ok(Box::new(Takeover {
            inner,
            admission: self.admission.clone(),
        }))
    }

    fn id(&self) -> Id {
        self.inner.id()
    }

    fn id_same(&self) -> Option<bool> {
        self.inner.id_same()
    }

    async fn set(&mut self, session: Session, tx: Tx) -> rmqtt::Result<()> {
        self.inner.set(session, tx).await
    }

    async fn remove(&mut self) -> rmqtt::Result<Option<(Session, Tx)>> {
        self.inner.remove().await
    }

    async fn remove_with(&mut self, id: &Id) -> rmqtt::Result<Option<(Session, Tx)>> {
        self.inner.remove_with(id).await
    }

    async fn kick(
        &mut self,
        clean_start: bool,
        clear_subscriptions: bool,
        is_admin: IsAdmin,
    ) -> rmqtt::Result<OfflineSession> {
        let ended = ended_for_good(self.inner.session()).await;
        let mut attempt = 1;
        loop {
            match self
                .inner
                .kick(clean_start, clear_subscriptions, is_admin)
                .await
            {
                // The previous connection has no session to keep (clean
                // session, or session expiry 0) but is still open or
                // closing (a DISCONNECT and a new CONNECT race on two
                // connections): its session ends with it. The client must
                // not be told "session present" (Paho's test_session_expiry
                // was, 1 run in 5).
                Ok(OfflineSession::Exist(Some(_))) if ended => {
                    return Ok(OfflineSession::Exist(None))
                }
                Ok(o) => return Ok(o),
                Err(e) if attempt >= ATTEMPTS => {
                    self.admission.give_back(&self.inner.id());
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(attempt, error = %e, "previous session still closing; asking again");
                    attempt += 1;
                    tokio::time::sleep(PAUSE).await;
                }
            }
        }
    }

    async fn online(&self) -> bool {
        self.inner.online().await
    }

    async fn is_connected(&self) -> bool {
        self.inner.is_connected().await
    }

    fn session(&self) -> Option<Session> {
        self.inner.session()
    }

    fn exist(&self) -> bool {
        self.inner.exist()
    }

    fn tx(&self) -> Option<Tx> {
        self.inner.tx()
    }

    async fn subscribe(&self, subscribe: &Subscribe) -> rmqtt::Result<SubscribeReturn> {
        self.inner.subscribe(subscribe).await
    }

    async fn unsubscribe(&self, unsubscribe: &Unsubscribe) -> rmqtt::Result<bool> {
        self.inner.unsubscribe(unsubscribe).await
    }

    async fn publish(&self, from: From, p: Publish) -> Result<(), (From, Publish, Reason)> {
        self.inner.publish(from, p).await
    }

    async fn subscriptions(&self) -> Option<Vec<SubsSearchResult>> {
        self.inner.subscriptions().await
    }
}

/// Whether `session` keeps no state once its connection ends: clean session
/// (3.1.1), or a session expiry of 0 (5; the DISCONNECT's, if it sent one),
/// as rmqtt decides when the session ends. Taking it over ends its
/// connection, and so the session.
async fn ended_for_good(session: Option<Session>) -> bool {
    let Some(s) = session else {
        return false;
    };
    let disconnect = s.disconnect().await.unwrap_or(None);
    match s.connect_info().await.as_deref() {
        Ok(rmqtt::types::ConnectInfo::V3(_, c)) => c.clean_session,
        Ok(_) => s
            .fitter
            .session_expiry_interval(disconnect.as_ref())
            .is_zero(),
        Err(_) => false,
    }
}

//! The broker restarts its listeners after rumqttd panics in a connection
//! task (rumqtt#1062 poisons a listener's mutex). In its own test binary:
//! the panic counter is process-wide and would restart the listeners of
//! every other test's gateway.

#[path = "it/support/mod.rs"]
mod support;

use std::time::Duration;

use support::Client;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rumqttd_panic_restarts_the_listeners_and_clients_keep_working() {
    let gw = support::start(&support::yaml_with_broker(
        "devices:\n  - { name: d, driver: simulator, poll: 100ms, points: [{ name: p, wave: sine }] }\nmappings:\n  - { match: '*/*', topic: 'x/{point}' }\n",
    ))
    .await;
    let addr = support::mqtt_addr(&gw);
    let mut before = Client::connect(addr, "t-before", &["x/p"]).await;
    before.expect("x/p", Duration::from_secs(5)).await;
    let restarts = edgebridge::broker::listener_restarts();

    edgebridge::broker::note_listener_panic();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while edgebridge::broker::listener_restarts() == restarts {
        assert!(
            tokio::time::Instant::now() < deadline,
            "listeners were not restarted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The connected client is untouched, and new clients get in on the same
    // port.
    before
        .drain_where(Duration::from_millis(100), |_| true)
        .await;
    before.expect("x/p", Duration::from_secs(5)).await;
    let mut after = Client::connect(addr, "t-after", &["x/p"]).await;
    after.expect("x/p", Duration::from_secs(5)).await;
    gw.shutdown().await;
}

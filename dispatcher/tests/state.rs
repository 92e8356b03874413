//! Event state records in a real nats-server KV bucket: forward-only, compare-and-set.

mod support;

use jobico_common::EventState;
use jobico_dispatcher::state::{self, Advanced, StateStore};
use serde_json::json;

#[tokio::test]
async fn states_only_move_forward_and_keep_the_job_name() {
    let (_server, js) = support::nats().await;
    let store = StateStore::open(&js).await.unwrap();
    // The ingress's record.
    assert_eq!(
        store
            .advance(state::status("ns", "ev1", "a", EventState::Accepted))
            .await
            .unwrap(),
        Advanced::Moved
    );
    let mut dispatched = state::status("ns", "ev1", "a", EventState::Dispatched);
    dispatched.job = Some("jobico-ev1-0123".into());
    assert_eq!(
        store.advance(dispatched.clone()).await.unwrap(),
        Advanced::Moved
    );
    assert_eq!(
        store
            .advance(state::status("ns", "ev1", "a", EventState::Running))
            .await
            .unwrap(),
        Advanced::Moved
    );
    let running = store.get("ns", "a").await.unwrap().unwrap();
    assert_eq!(
        (running.state, running.job.as_deref()),
        (EventState::Running, Some("jobico-ev1-0123"))
    );
    // A late or replayed earlier state changes nothing.
    assert_eq!(store.advance(dispatched).await.unwrap(), Advanced::Skipped);
    assert_eq!(
        store.get("ns", "a").await.unwrap().unwrap().state,
        EventState::Running
    );
    // A final state without a summary may gain one once; nothing else replaces it.
    assert_eq!(
        store
            .advance(state::status("ns", "ev1", "a", EventState::Succeeded))
            .await
            .unwrap(),
        Advanced::Moved
    );
    let mut with_summary = state::status("ns", "ev1", "a", EventState::Succeeded);
    with_summary.summary = Some(json!({"id": "a", "status": "succeeded"}));
    assert_eq!(
        store.advance(with_summary.clone()).await.unwrap(),
        Advanced::Amended
    );
    assert_eq!(
        store.advance(with_summary).await.unwrap(),
        Advanced::Skipped
    );
    assert_eq!(
        store
            .advance(state::status("ns", "ev1", "a", EventState::Failed))
            .await
            .unwrap(),
        Advanced::Skipped
    );
    let last = store.get("ns", "a").await.unwrap().unwrap();
    assert_eq!(last.state, EventState::Succeeded);
    assert_eq!(last.summary.unwrap()["status"], "succeeded");
    assert!(store.get("ns", "missing").await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_writers_never_move_a_record_backwards() {
    let (_server, js) = support::nats().await;
    let store = StateStore::open(&js).await.unwrap();
    let writes = [
        EventState::Dispatched,
        EventState::Running,
        EventState::Failed,
        EventState::Dispatched,
        EventState::Running,
    ]
    .into_iter()
    .map(|s| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .advance(state::status("ns", "ev1", "b", s))
                .await
                .unwrap()
        })
    });
    for write in writes {
        write.await.unwrap();
    }
    assert_eq!(
        store.get("ns", "b").await.unwrap().unwrap().state,
        EventState::Failed
    );
}

//! Event state records in a real nats-server KV bucket: forward-only, compare-and-set.

use jobico_common::EventState;
use jobico_store::{self as state, Advanced, BucketSettings, Claim, StateStore};
use jobico_testkit::NatsServer;
use serde_json::json;

async fn nats() -> (NatsServer, async_nats::jetstream::Context) {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    (server, async_nats::jetstream::new(client))
}

async fn open(js: &async_nats::jetstream::Context) -> StateStore {
    StateStore::open(js, &BucketSettings::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn states_only_move_forward_and_keep_the_job_name() {
    let (_server, js) = nats().await;
    let store = open(&js).await;
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
    let running = store.get("ns", "ev1", "a").await.unwrap().unwrap();
    assert_eq!(
        (running.state, running.job.as_deref()),
        (EventState::Running, Some("jobico-ev1-0123"))
    );
    // A late or replayed earlier state changes nothing.
    assert_eq!(store.advance(dispatched).await.unwrap(), Advanced::Skipped);
    assert_eq!(
        store.get("ns", "ev1", "a").await.unwrap().unwrap().state,
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
    let last = store.get("ns", "ev1", "a").await.unwrap().unwrap();
    assert_eq!(last.state, EventState::Succeeded);
    assert_eq!(last.summary.unwrap()["status"], "succeeded");
    assert!(store.get("ns", "ev1", "missing").await.unwrap().is_none());
}

#[tokio::test]
async fn concurrent_writers_never_move_a_record_backwards() {
    let (_server, js) = nats().await;
    let store = open(&js).await;
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
        store.get("ns", "ev1", "b").await.unwrap().unwrap().state,
        EventState::Failed
    );
}

#[tokio::test]
async fn the_same_id_in_two_event_types_is_two_records() {
    let (_server, js) = nats().await;
    let store = open(&js).await;
    store
        .advance(state::status(
            "ns",
            "ev1",
            "order-42",
            EventState::Succeeded,
        ))
        .await
        .unwrap();
    // ev2's event with the same id is not ev1's: it has no record yet and can be claimed.
    assert!(store.get("ns", "ev2", "order-42").await.unwrap().is_none());
    assert!(matches!(
        store
            .claim("ns", "ev2", "order-42", "jobico-ev2-1")
            .await
            .unwrap(),
        Claim::Claimed { .. }
    ));
    assert_eq!(
        store.events_with("ns", "order-42").await.unwrap(),
        ["ev1", "ev2"]
    );
    assert_eq!(
        store.events_with("ns", "order").await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.events_with("other", "order-42").await.unwrap(),
        Vec::<String>::new()
    );
    // Ids with dots are several subject tokens; the lookup still finds exactly them.
    store
        .advance(state::status("ns", "ev1", "a.b", EventState::Accepted))
        .await
        .unwrap();
    store
        .advance(state::status("ns", "ev1", "a.b.c", EventState::Held))
        .await
        .unwrap();
    assert_eq!(store.events_with("ns", "a.b").await.unwrap(), ["ev1"]);
}

#[tokio::test]
async fn a_claim_never_overwrites_another_jobs_claim_unless_taken_over_at_its_revision() {
    let (_server, js) = nats().await;
    let store = open(&js).await;
    let Claim::Claimed { revision } = store.claim("ns", "ev1", "e", "job-a").await.unwrap() else {
        panic!("a fresh event is claimed");
    };
    // Claiming again for the same Job is idempotent.
    assert_eq!(
        store.claim("ns", "ev1", "e", "job-a").await.unwrap(),
        Claim::Claimed { revision }
    );
    // Another Job's claim is reported, not overwritten.
    let Claim::Elsewhere {
        current,
        revision: seen,
    } = store.claim("ns", "ev1", "e", "job-b").await.unwrap()
    else {
        panic!("job-a's claim must be reported");
    };
    assert_eq!((current.job.as_deref(), seen), (Some("job-a"), revision));
    // A take-over at a stale revision changes nothing.
    let stale = store
        .take_over("ns", "ev1", "e", "job-b", (&current, revision + 100))
        .await
        .unwrap();
    assert!(matches!(stale, Claim::Elsewhere { .. }), "{stale:?}");
    assert!(matches!(
        store
            .take_over("ns", "ev1", "e", "job-b", (&current, revision))
            .await
            .unwrap(),
        Claim::Claimed { .. }
    ));
    assert_eq!(
        store
            .get("ns", "ev1", "e")
            .await
            .unwrap()
            .unwrap()
            .job
            .as_deref(),
        Some("job-b")
    );
    // Running or finished events are never claimed again.
    store
        .advance(state::status("ns", "ev1", "e", EventState::Running))
        .await
        .unwrap();
    assert!(matches!(
        store.claim("ns", "ev1", "e", "job-c").await.unwrap(),
        Claim::Done(_)
    ));
    // A held record is claimable, and is not written over a claim.
    let mut held = state::status("ns", "ev1", "h", EventState::Held);
    held.reason = Some("module missing".into());
    assert_eq!(store.advance(held.clone()).await.unwrap(), Advanced::Moved);
    assert_eq!(
        store.advance(held.clone()).await.unwrap(),
        Advanced::Skipped
    );
    assert!(matches!(
        store.claim("ns", "ev1", "h", "job-h").await.unwrap(),
        Claim::Claimed { .. }
    ));
    assert_eq!(store.advance(held).await.unwrap(), Advanced::Skipped);
}

#[tokio::test]
async fn the_chain_around_an_event_survives_every_later_state() {
    use jobico_common::{EventLink, RouteFailure};
    let (_server, js) = nats().await;
    let store = open(&js).await;
    let parent = EventLink {
        event: "order".into(),
        id: "p".into(),
    };
    // A routed event's parent is linked before anything claims it.
    let mut child = state::status("ns", "invoice", "c", EventState::Accepted);
    child.parent = Some(parent.clone());
    assert!(store.link(&child).await.unwrap());
    assert!(
        !store.link(&child).await.unwrap(),
        "a second link writes nothing"
    );
    assert!(matches!(
        store.claim("ns", "invoice", "c", "job-a").await.unwrap(),
        Claim::Claimed { .. }
    ));
    let Claim::Elsewhere { current, revision } =
        store.claim("ns", "invoice", "c", "job-b").await.unwrap()
    else {
        panic!("job-a holds it");
    };
    store
        .take_over("ns", "invoice", "c", "job-b", (&current, revision))
        .await
        .unwrap();
    store
        .advance(state::status("ns", "invoice", "c", EventState::Succeeded))
        .await
        .unwrap();
    let done = store.get("ns", "invoice", "c").await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.job.as_deref(), done.parent.as_ref()),
        (EventState::Succeeded, Some("job-b"), Some(&parent))
    );

    // The parent, claimed, gains its children and a failed route; its final state keeps them.
    store.claim("ns", "order", "p", "job-p").await.unwrap();
    let mut links = state::status("ns", "order", "p", EventState::Accepted);
    links.children = vec![EventLink {
        event: "invoice".into(),
        id: "c".into(),
    }];
    links.route_failures = vec![RouteFailure {
        event: "alert".into(),
        id: "d".into(),
        reason: "not JSON".into(),
    }];
    assert!(store.link(&links).await.unwrap());
    let linked = store.get("ns", "order", "p").await.unwrap().unwrap();
    assert_eq!(
        linked.state,
        EventState::Dispatched,
        "a link keeps the state"
    );
    store
        .advance(state::status("ns", "order", "p", EventState::Succeeded))
        .await
        .unwrap();
    let done = store.get("ns", "order", "p").await.unwrap().unwrap();
    assert_eq!(done.children, links.children);
    assert_eq!(done.route_failures, links.route_failures);
    // A final record written without them gains them once they come.
    let mut late = state::status("ns", "order", "q", EventState::Succeeded);
    store.advance(late.clone()).await.unwrap();
    late.children = links.children.clone();
    assert_eq!(store.advance(late).await.unwrap(), Advanced::Amended);
    assert_eq!(
        store
            .get("ns", "order", "q")
            .await
            .unwrap()
            .unwrap()
            .children,
        links.children
    );
}

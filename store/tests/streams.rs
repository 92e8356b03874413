//! The per-namespace event streams against a real nats-server: created with their limits,
//! updated to new ones, and the single stream of earlier releases retired only when empty.

use async_nats::jetstream::{self, stream};
use jobico_common::subject::{LEGACY_STREAM, event_subject, stream_name};
use jobico_store::StreamSettings;
use jobico_store::streams::{self, StreamError};
use jobico_testkit::NatsServer;

async fn context(server: &NatsServer) -> jetstream::Context {
    jetstream::new(async_nats::connect(server.url()).await.unwrap())
}

#[tokio::test]
async fn each_namespace_gets_its_own_stream_and_limits_follow_the_settings() {
    let server = NatsServer::start();
    let js = context(&server).await;
    let two = StreamSettings {
        max_messages: 2,
        ..Default::default()
    };
    let mut a = streams::ensure(&js, "team-a", &two).await.unwrap();
    streams::ensure(&js, "team-b", &two).await.unwrap();
    for id in ["1", "2", "3"] {
        let ack = js
            .publish(event_subject("team-a", "ev1", id), "{}".into())
            .await
            .unwrap()
            .await;
        match id {
            "3" => assert!(streams::is_full(&ack.unwrap_err()), "a third event fit"),
            _ => {
                ack.unwrap();
            }
        }
    }
    // team-b's stream is its own: still empty and open.
    js.publish(event_subject("team-b", "ev1", "1"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(a.info().await.unwrap().state.messages, 2);

    // A restart with new limits updates the existing stream and keeps its events.
    let ten = StreamSettings {
        max_messages: 10,
        ..Default::default()
    };
    let mut a = streams::ensure(&js, "team-a", &ten).await.unwrap();
    let info = a.info().await.unwrap();
    assert_eq!(info.config.max_messages, 10);
    assert_eq!(info.state.messages, 2);
    js.publish(event_subject("team-a", "ev1", "3"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn the_legacy_stream_is_removed_when_empty_and_kept_with_a_reason_when_not() {
    let server = NatsServer::start();
    let js = context(&server).await;
    // Nothing to retire.
    streams::retire_legacy(&js).await.unwrap();

    let legacy = stream::Config {
        name: LEGACY_STREAM.into(),
        subjects: vec!["jobico.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    };
    js.create_stream(legacy.clone()).await.unwrap();
    // Its subjects overlap: no namespace stream can be created beside it.
    assert!(
        streams::ensure(&js, "default", &StreamSettings::default())
            .await
            .is_err()
    );
    js.publish(event_subject("default", "ev1", "old-1"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let refused = streams::retire_legacy(&js).await.unwrap_err();
    assert!(
        matches!(refused, StreamError::LegacyHoldsEvents { messages: 1 }),
        "{refused}"
    );
    assert!(
        refused
            .to_string()
            .contains("let the earlier dispatcher empty it")
    );
    assert!(
        js.get_stream(LEGACY_STREAM).await.is_ok(),
        "an event was dropped"
    );

    // Drained by the earlier dispatcher: removed, and the namespace's stream can be created.
    js.get_stream(LEGACY_STREAM)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    streams::retire_legacy(&js).await.unwrap();
    assert!(js.get_stream(LEGACY_STREAM).await.is_err());
    streams::ensure(&js, "default", &StreamSettings::default())
        .await
        .unwrap();
    assert!(js.get_stream(stream_name("default")).await.is_ok());
}

#[tokio::test]
async fn a_change_jetstream_refuses_leaves_the_stream_as_it_is() {
    let server = NatsServer::start();
    let js = context(&server).await;
    let limits = StreamSettings {
        retention: jobico_store::Retention::Limits,
        ..Default::default()
    };
    streams::ensure(&js, "default", &limits).await.unwrap();
    js.publish(event_subject("default", "ev1", "1"), "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Retention cannot change on an existing stream: kept, with its event, and usable.
    let mut kept = streams::ensure(&js, "default", &StreamSettings::default())
        .await
        .unwrap();
    let info = kept.info().await.unwrap();
    assert_eq!(info.config.retention, stream::RetentionPolicy::Limits);
    assert_eq!(info.state.messages, 1);
}

//! Slow and idle clients cannot hold the ingress's memory: a real server on a loopback port,
//! raw TCP clients, and an allocator that counts the bytes the process holds.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cap::Cap;
use jobico_apiserver::{AppState, MemoryQueue, server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATED: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

/// The body limit the connections declare: the default.
const LIMIT: usize = jobico_apiserver::http::DEFAULT_MAX_BODY_BYTES;

/// Connections opened at once, each declaring a body of `LIMIT` bytes: with the declared length
/// allocated up front, 64 MiB would be held for bodies nobody sends.
const CONNECTIONS: usize = 256;

async fn serve(body_timeout: Duration) -> (std::net::SocketAddr, Arc<AppState>, CancellationToken) {
    let (queue, receiver) = MemoryQueue::new(CONNECTIONS);
    // The receiver lives as long as the test: the queue stays open.
    std::mem::forget(receiver);
    let mut state = AppState::new(common::catalog(), Arc::new(queue), LIMIT);
    state.body_timeout = body_timeout;
    let state = actix_web::web::Data::new(state);
    let bound = server::bind("127.0.0.1:0".parse().unwrap(), 1, state.clone()).unwrap();
    let addr = bound.local_addr;
    let stop = CancellationToken::new();
    tokio::spawn(bound.run(stop.clone()));
    (addr, state.into_inner(), stop)
}

/// Waits until `count` requests are in the handlers (each is reading its body).
async fn wait_in_flight(state: &AppState, count: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while state.metrics.in_flight.get() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} requests reached the handler",
            state.metrics.in_flight.get()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn head(length: usize) -> String {
    format!(
        "PUT /execute/default/ev1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_declaring_huge_bodies_hold_only_what_they_sent() {
    let (addr, state, stop) = serve(Duration::from_secs(60)).await;
    let before = ALLOCATED.allocated();
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head(LIMIT).as_bytes()).await.unwrap();
        tcp.write_all(b"{\"firstName\":").await.unwrap();
        connections.push(tcp);
    }
    wait_in_flight(&state, CONNECTIONS as i64).await;
    let held = ALLOCATED.allocated().saturating_sub(before);
    let per_connection = held / CONNECTIONS;
    eprintln!("{per_connection} bytes held per connection waiting for its body");
    // What a connection costs (socket, actix buffers, the request, a small body buffer) is a
    // few tens of KiB; a buffer sized from the declared length alone would be 256 KiB.
    assert!(
        per_connection < LIMIT / 4,
        "{per_connection} bytes held per idle connection ({held} in all)"
    );

    // The server still answers everyone else at once.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let body = common::VALID;
    tcp.write_all(format!("{}{body}", head(body.len())).as_bytes())
        .await
        .unwrap();
    let mut answer = vec![0; 1024];
    let n = tcp.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    drop(connections);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_408_with_the_error_shape() {
    let (addr, _state, stop) = serve(Duration::from_millis(300)).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head(100).as_bytes()).await.unwrap();
    tcp.write_all(b"{\"firstName\":").await.unwrap();
    // The client sends nothing more; the server answers and closes.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer))
        .await
        .expect("the server must answer a stalled body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("did not arrive within 300 ms"),
        "{json}"
    );
    stop.cancel();
}

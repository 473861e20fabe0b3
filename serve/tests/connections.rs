//! Slow and silent clients are cut off while others are served; the number
//! of open connections is bounded; malformed HTTP gets a 4xx, never a
//! crash.

mod common;

use std::time::{Duration, Instant};

use common::{Client, digit_rows, start, test_config};
use netcl_serve::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or `limit` passes, which
/// fails the test); returns what was read and when the close came.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (String::from_utf8_lossy(&out).into_owned(), start.elapsed());
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

fn fast_timeouts() -> Config {
    Config {
        idle_timeout: Duration::from_millis(700),
        request_timeout: Duration::from_millis(1500),
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_while_others_are_served() {
    let server = start(fast_timeouts()).await;
    let addr = server.local_addr();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let reader =
        tokio::spawn(async move { read_until_closed(&mut silent, Duration::from_secs(10)).await });
    // Others are served meanwhile.
    let mut client = Client::connect(addr).await;
    for _ in 0..5 {
        assert_eq!(client.predict(&digit_rows()[..2]).await.status, 200);
    }
    let (text, after) = reader.await.unwrap();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert!(
        after >= Duration::from_millis(600),
        "closed after {after:?}"
    );
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_is_cut_off() {
    let server = start(fast_timeouts()).await;
    let addr = server.local_addr();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let request = b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n";
    let trickle = tokio::spawn(async move {
        let start = Instant::now();
        // One byte every 100 ms: the headers would take 9 s.
        for byte in request {
            if slow.write_all(&[*byte]).await.is_err() {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sent every header byte without being cut off");
    });
    let mut client = Client::connect(addr).await;
    for _ in 0..5 {
        assert_eq!(client.predict(&digit_rows()[..1]).await.status, 200);
    }
    let cut_after = tokio::time::timeout(Duration::from_secs(10), trickle)
        .await
        .expect("cut off within 10 s")
        .unwrap();
    assert!(
        cut_after < Duration::from_secs(5),
        "cut off after {cut_after:?}"
    );
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_body_gets_408() {
    let server = start(fast_timeouts()).await;
    let addr = server.local_addr();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{\"inputs\"")
        .await
        .unwrap();
    let (mut read_half, mut write_half) = slow.into_split();
    let writer = tokio::spawn(async move {
        for _ in 0..100 {
            if write_half.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut out = Vec::new();
    let start = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(10), read_half.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "still open after 10 s");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("{\"error\":\"request not completed within 1500 ms\"}"),
        "{text}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    writer.abort();
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_bounded() {
    let server = start(Config {
        max_connections: 3,
        ..fast_timeouts()
    })
    .await;
    let addr = server.local_addr();
    // Three idle connections hold every slot...
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so a fourth is not served until the idle ones are closed by the
    // idle timeout (700 ms).
    let start = Instant::now();
    let mut client = Client::connect(addr).await;
    let reply = client.predict(&digit_rows()[..1]).await;
    assert_eq!(reply.status, 200);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "served after {waited:?} beside 3 idle connections"
    );
    assert!(server.metrics().responses_with_status(200) == 1);
    drop(idle);
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_a_4xx_and_the_server_goes_on() {
    let server = start(fast_timeouts()).await;
    let addr = server.local_addr();
    let garbage: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-length: nope\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nbad header without colon\r\n\r\n",
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let (text, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
    }
    let mut client = Client::connect(addr).await;
    assert_eq!(client.get("/healthz").await.status, 200);
    server.shutdown();
    server.wait().await.unwrap();
}

/// Pipelines `count` requests on a new connection and never reads a reply:
/// once the socket buffers are full, the server's writes to it stall.
async fn stalled_reader(addr: std::net::SocketAddr, count: usize) -> tokio::task::JoinHandle<()> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (_read, mut write) = stream.into_split();
    let requests = b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n".repeat(count);
    tokio::spawn(async move {
        // The write itself stalls once the server stops reading; the
        // connection stays open (neither half is dropped) until the test
        // ends.
        let _ = write.write_all(&requests).await;
        let _read = _read;
        tokio::time::sleep(Duration::from_secs(60)).await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_replies_are_cut_off() {
    // Before: a client that pipelined requests and never read held its
    // connection forever (the server waited on a full socket), so two of
    // them took every slot of a server with `max_connections: 2`.
    let server = start(Config {
        max_connections: 2,
        ..fast_timeouts()
    })
    .await;
    let addr = server.local_addr();
    let stalled = [
        stalled_reader(addr, 20_000).await,
        stalled_reader(addr, 20_000).await,
    ];
    // Let the stalled connections fill their buffers and take both slots.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        let mut client = Client::connect(addr).await;
        client.predict(&digit_rows()[..1]).await.status
    })
    .await;
    assert_eq!(
        served,
        Ok(200),
        "a client was not served within 10 s beside two connections that never read"
    );
    println!(
        "served after {:?} beside two stalled readers",
        start.elapsed()
    );
    for task in stalled {
        task.abort();
    }
    server.shutdown();
    server.wait().await.unwrap();
}

//! What a browser gets from a node: the demo chat page, the JavaScript client, the dashboard
//! and its stream of figures, and the Prometheus text a scraper reads.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Dashboards streaming at once at most (`src/server/pages.rs`, `MAX_VIEWERS`).
const MAX_VIEWERS: usize = 16;

/// A GET whose whole answer (head and body) is read until the server closes.
async fn get_whole(node: &Node, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8(raw).expect("utf-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    (head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn a_browser_gets_the_demo_page_the_client_and_the_dashboard() {
    let node = Node::start().await;
    let cases = [
        ("/", "text/html", "id=\"messages\""),
        ("/demo.js", "text/javascript", "roomcastDemo"),
        ("/roomcast.js", "text/javascript", "RoomcastClient"),
        ("/dashboard", "text/html", "id=\"connections\""),
        ("/dashboard.js", "text/javascript", "EventSource"),
    ];
    for (path, content_type, marker) in cases {
        let (head, body) = get_whole(&node, path).await;
        assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{path}: {head}"
        );
        assert!(body.contains(marker), "{path} lacks {marker}");
        if content_type == "text/html" {
            // No inline script may run: the pages load theirs from this origin.
            assert!(
                head.contains("content-security-policy: default-src 'none'; script-src 'self';"),
                "{path}: {head}"
            );
            assert!(!body.contains("<script>"), "{path} has an inline script");
        }
    }
}

#[tokio::test]
async fn without_pages_the_root_answers_as_before() {
    let node = Node::start_with(|c| c.pages = false).await;
    assert_eq!(node.get("/").await.0, 426);
    assert_eq!(node.get("/dashboard").await.0, 404);
    assert_eq!(node.get("/roomcast.js").await.0, 404);
}

/// Opens the dashboard's stream; returns its status line and, for 200, the first event's data.
async fn first_event(node: &Node) -> (TcpStream, String, Option<serde_json::Value>) {
    let mut stream = TcpStream::connect(node.addr).await.expect("connect");
    let req = "GET /dashboard/events HTTP/1.1\r\nHost: test\r\n\r\n";
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("bytes in time")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.lines().next().unwrap_or_default().to_owned();
        if !status.contains(" 200 ") && text.contains("\r\n\r\n") {
            return (stream, status, None);
        }
        // The body is chunked: the event is the JSON between "data: " and its blank line.
        if let Some(at) = text.find("data: ") {
            if let Some(end) = text[at..].find("\n\n") {
                let json = &text[at + 6..at + end];
                let value = serde_json::from_str(json).expect("an event is JSON");
                return (stream, status, Some(value));
            }
        }
    }
}

#[tokio::test]
async fn the_dashboard_stream_reports_the_node_and_caps_its_viewers() {
    let node = Node::start().await;
    let mut a = node.client().await;
    let mut b = node.client().await;
    send(&mut a, &subscribe("seen")).await;
    sync(&mut a, "a").await;
    send(&mut b, &send_message("seen", "hello")).await;
    assert_eq!(recv(&mut a).await, "hello");

    let (first, status, event) = first_event(&node).await;
    assert!(status.contains(" 200 "), "{status}");
    let event = event.expect("an event");
    assert_eq!(event["connections"], 2, "{event}");
    assert_eq!(event["backplane"], "none");
    assert!(event["messages_in"].as_u64() >= Some(1), "{event}");
    assert!(event["deliveries"].as_u64() >= Some(1), "{event}");
    assert!(event["rss_bytes"].as_u64() > Some(1 << 20), "{event}");
    assert!(event["refused_by"].get("per_ip").is_some(), "{event}");

    let mut open = vec![first];
    for _ in 1..MAX_VIEWERS {
        let (stream, status, _) = first_event(&node).await;
        assert!(status.contains(" 200 "), "{status}");
        open.push(stream);
    }
    let (_, status, _) = first_event(&node).await;
    assert!(status.contains(" 503 "), "one viewer too many: {status}");
    let (_, metrics) = node.get("/metrics").await;
    assert!(
        metrics.contains(&format!("roomcast_dashboard_viewers {MAX_VIEWERS}\n")),
        "the viewers gauge"
    );
    // A viewer that leaves gives its place back.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, status, _) = first_event(&node).await;
        if status.contains(" 200 ") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "place not given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Every series a scraper reads has its `# HELP` and `# TYPE`, and the histograms and
/// process figures are there.
#[tokio::test]
async fn every_metric_has_help_and_type_and_the_histograms_are_filled() {
    let node = Node::start().await;
    let mut a = node.client().await;
    send(&mut a, &subscribe("m")).await;
    send(&mut a, &send_message("m", "x")).await;
    assert_eq!(recv(&mut a).await, "x");
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 200);
    let (mut helped, mut typed) = (Vec::new(), Vec::new());
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.push(rest.split(' ').next().unwrap_or_default().to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split(' ').next().unwrap_or_default().to_owned());
        } else if !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| typed.iter().any(|t| t == f))
                })
                .unwrap_or(name);
            assert!(helped.iter().any(|h| h == family), "no HELP for {line}");
            assert!(typed.iter().any(|t| t == family), "no TYPE for {line}");
        }
    }
    let count = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert!(count("roomcast_fanout_seconds_count") >= 1.0);
    assert!(count("roomcast_handshake_seconds_count") >= 1.0);
    assert!(count("roomcast_write_frames_count") >= 1.0);
    assert!(count("process_resident_memory_bytes") > 1e6);
    assert!(count("process_open_fds") >= 3.0);
    assert!(body.contains("roomcast_connections_refused_total{reason=\"per_ip\"} 0"));
}

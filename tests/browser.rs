//! The demo page and the dashboard in a real browser: Debian's chromium, headless, driven
//! through chromedriver with fantoccini. `scripts/test.sh` installs both when missing; without
//! them these tests fail and say so.

mod common;

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

/// A chromedriver of the test's own on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // Its own process group, so that dropping the driver also ends the browsers it
        // started, even when a test panicked before closing them.
        let child = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver on PATH (scripts/test.sh installs chromium-driver)");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, port }
    }

    /// A fresh headless browser. As root, chromium needs `--no-sandbox`.
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1200,900"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a browser session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` (a JavaScript expression's body that `return`s) until it returns true.
async fn until(page: &Client, what: &str, script: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let value = page.execute(script, vec![]).await.expect("script runs");
        if value == serde_json::Value::Bool(true) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} (last: {value})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens the demo page for `name` in `room`, connected and joined.
async fn chat_page(driver: &Driver, node: &Node, room: &str, name: &str) -> Client {
    let page = driver.browser().await;
    let url = format!("http://{}/?room={room}&name={name}&auto=1", node.addr);
    page.goto(&url).await.expect("open the page");
    until(
        &page,
        "the join",
        "return document.body.dataset.joined === '1';",
    )
    .await;
    page
}

/// Waits until `page` shows a message whose text is exactly `text`.
async fn until_shown(page: &Client, text: &str) {
    let script = format!(
        "return Array.from(document.querySelectorAll('#messages .message')).some(e => e.textContent === {});",
        serde_json::Value::from(text)
    );
    until(page, text, &script).await;
}

/// Opens the dashboard of `node`.
async fn dashboard_page(driver: &Driver, node: &Node) -> Client {
    let page = driver.browser().await;
    page.goto(&format!("http://{}/dashboard", node.addr))
        .await
        .expect("open the dashboard");
    page
}

/// Types `text` on `page` and sends it.
async fn say(page: &Client, text: &str) {
    let input = page.find(Locator::Id("text")).await.expect("#text");
    input.send_keys(text).await.expect("type");
    page.find(Locator::Id("send"))
        .await
        .expect("#send")
        .click()
        .await
        .expect("click");
}

/// The texts of the messages `page` shows.
async fn shown(page: &Client) -> Vec<String> {
    let value = page
        .execute(
            "return Array.from(document.querySelectorAll('#messages .message')).map(e => e.textContent);",
            vec![],
        )
        .await
        .expect("script runs");
    serde_json::from_value(value).expect("a list of strings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_chat_and_markup_shows_as_text() {
    let node = Node::start().await;
    let driver = Driver::start().await;
    let alice = chat_page(&driver, &node, "b1", "alice").await;
    let bob = chat_page(&driver, &node, "b1", "bob").await;

    say(&alice, "hello bob").await;
    until_shown(&bob, "alice: hello bob").await;

    let markup = "<img src=x onerror=alert(1)>";
    say(&alice, markup).await;
    let expected = format!("alice: {markup}");
    until_shown(&bob, &expected).await;
    assert!(shown(&bob).await.contains(&expected));
    let images = bob
        .execute(
            "return document.querySelectorAll('#messages img').length;",
            vec![],
        )
        .await
        .expect("script runs");
    assert_eq!(images, 0, "the message was rendered as markup");
    assert!(
        bob.get_alert_text().await.is_err(),
        "the message's script ran"
    );
    for page in [alice, bob] {
        page.close().await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_counts_the_open_pages_and_sees_messages() {
    let node = Node::start().await;
    let driver = Driver::start().await;
    let first = chat_page(&driver, &node, "d1", "ann").await;
    let second = chat_page(&driver, &node, "d1", "ben").await;
    let dashboard = dashboard_page(&driver, &node).await;
    // The pages are the node's only WebSocket connections (the dashboard streams over HTTP).
    until(
        &dashboard,
        "two connections",
        "return document.getElementById('connections').dataset.value === '2';",
    )
    .await;
    // Messages keep going until a one-second window of the dashboard has seen some.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        say(&first, "tick").await;
        let rate = dashboard
            .execute(
                "return parseFloat(document.getElementById('messages-per-s').dataset.value || '0');",
                vec![],
            )
            .await
            .expect("script runs");
        if rate.as_f64() > Some(0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages per second stayed {rate}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for page in [first, second, dashboard] {
        page.close().await.expect("close");
    }
}

/// `scripts/screenshots.sh` runs this (ignored otherwise) to regenerate `docs/demo.png` and
/// `docs/dashboard.png`: two people chatting beside 40 busy clients, and the dashboard after
/// ten seconds of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes the README's screenshots; run by scripts/screenshots.sh"]
async fn screenshots() {
    let out = std::env::var("ROOMCAST_SCREENSHOTS").unwrap_or_else(|_| "docs".to_owned());
    let node = Node::start().await;
    let driver = Driver::start().await;
    let alice = chat_page(&driver, &node, "lobby", "alice").await;
    let bob = chat_page(&driver, &node, "lobby", "bob").await;
    let dashboard = dashboard_page(&driver, &node).await;
    let mut busy = Vec::new();
    for n in 0..40 {
        let mut ws = node.client().await;
        send(&mut ws, &subscribe(&format!("busy{}", n % 4))).await;
        busy.push(ws);
    }
    let lines = [
        (&alice, "hi bob, is the build green?"),
        (&bob, "all green: 0 lost, 0 duplicated"),
        (&alice, "<b>markup</b> shows as text, as it should"),
        (&bob, "see the dashboard for the numbers"),
    ];
    for (page, text) in lines {
        say(page, text).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for second in 0..10 {
        for (n, ws) in busy.iter_mut().enumerate() {
            let room = format!("busy{}", n % 4);
            send(ws, &send_message(&room, &format!("load {second}"))).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let demo = bob.screenshot().await.expect("screenshot of the demo");
    std::fs::write(format!("{out}/demo.png"), demo).expect("write demo.png");
    let dash = dashboard
        .screenshot()
        .await
        .expect("screenshot of the dashboard");
    std::fs::write(format!("{out}/dashboard.png"), dash).expect("write dashboard.png");
    for page in [alice, bob, dashboard] {
        page.close().await.expect("close");
    }
}

/// `scripts/browser-latency.sh` runs this (ignored otherwise) against a node it started, with
/// loadgen's clients in the same room: ten demo pages each send a message a second for 20 s,
/// and every other page's arrival time is matched to the send time (both the browser's wall
/// clock, one machine). Prints the median and p99 of those delays and each page's received
/// and rendered counts, as JSON on one line starting `LATENCY `.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by scripts/browser-latency.sh"]
async fn browser_latency() {
    let base = std::env::var("ROOMCAST_HTTP").expect("ROOMCAST_HTTP=http://host:port");
    let room = std::env::var("ROOMCAST_ROOM").unwrap_or_else(|_| "lg-0".to_owned());
    let driver = Driver::start().await;
    let mut pages = Vec::new();
    for n in 0..10 {
        let page = driver.browser().await;
        let url = format!("{base}/?room={room}&name=page{n}&auto=1");
        page.goto(&url).await.expect("open the page");
        until(
            &page,
            "the join",
            "return document.body.dataset.joined === '1';",
        )
        .await;
        pages.push(page);
    }
    for round in 0..20 {
        for (n, page) in pages.iter().enumerate() {
            say(page, &format!("m{round}-{n}")).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sent = std::collections::HashMap::new();
    let mut arrivals = Vec::new();
    let mut counts = Vec::new();
    for page in &pages {
        let v = page
            .execute(
                "const d = window.roomcastDemo; return {sent: d.sent, received: d.received, \
                 state: {received: d.state.received, rendered: d.state.rendered}};",
                vec![],
            )
            .await
            .expect("script runs");
        for s in v["sent"].as_array().into_iter().flatten() {
            let text = s["text"].as_str().unwrap_or_default().to_owned();
            sent.insert(text, s["at"].as_f64().unwrap_or(f64::NAN));
        }
        for r in v["received"].as_array().into_iter().flatten() {
            let text = r["text"].as_str().unwrap_or_default().to_owned();
            arrivals.push((text, r["at"].as_f64().unwrap_or(f64::NAN)));
        }
        counts.push(v["state"].clone());
    }
    let mut delays: Vec<f64> = arrivals
        .iter()
        .filter_map(|(text, at)| sent.get(text).map(|sent_at| at - sent_at))
        .collect();
    delays.sort_by(f64::total_cmp);
    let at =
        |q: f64| delays[((q * delays.len() as f64).ceil() as usize).clamp(1, delays.len()) - 1];
    let expected = sent.len() * (pages.len() - 1);
    let report = serde_json::json!({
        "sent": sent.len(),
        "arrivals_matched": delays.len(),
        "arrivals_expected": expected,
        "median_ms": at(0.5),
        "p99_ms": at(0.99),
        "max_ms": delays.last(),
        "pages": counts,
    });
    println!("LATENCY {report}");
    assert_eq!(
        delays.len(),
        expected,
        "every page saw every other page's messages"
    );
    for page in pages {
        page.close().await.expect("close");
    }
}

//! loadgen must catch a broken server. A small room server is built here on
//! tokio-tungstenite, able to misbehave in one chosen way, and loadgen's report has to show
//! exactly that fault (and nothing at all against the correct server).

mod support;

use std::time::Duration;

use loadgen::{Config, Dialect, Report};
use support::{start_server, Fault};

/// 20 clients in 2 rooms, 2 senders each at 50/s, a short warm-up and window. Built as a
/// plain struct, so no LOADGEN_* variable in the shell running the tests can change it.
fn config(url: &str) -> Config {
    Config {
        urls: vec![url.to_string()],
        clients: 20,
        rooms: 2,
        senders_per_room: 2,
        rate: 50.0,
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs(1),
        // Clean runs end the drain as soon as everything arrived, so a generous drain only
        // guards against a slow (debug, loaded) machine; lossy runs get a shorter one.
        drain: Duration::from_secs(3),
        settle: Duration::from_millis(100),
        quiet: true,
        ..Config::default()
    }
}

/// For faults that lose messages: the drain always runs out, so keep it short.
fn lossy(c: &mut Config) {
    c.drain = Duration::from_secs(1);
}

fn as_is(_: &mut Config) {}

async fn run_against(fault: Fault, adjust: fn(&mut Config)) -> Report {
    let url = start_server(fault).await;
    let mut cfg = config(&url);
    adjust(&mut cfg);
    let report = loadgen::run(cfg).await.expect("loadgen run");
    println!("--- {fault:?} ---\n{}", report.to_text());
    assert_eq!(report.connect.connected, 20, "all clients connect");
    assert_eq!(report.connect.not_ready, 0, "all memberships confirmed");
    assert!(report.totals.sent > 100, "senders sent on schedule");
    assert_eq!(report.unparseable_frames, 0);
    if !matches!(fault, Fault::Errors(_) | Fault::Refuse(_)) {
        assert_eq!(report.server_errors, 0);
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correct_server_subscribe_is_clean() {
    let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("report.json");
    let plot = dir.join("latency.svg");
    let url = start_server(Fault::None).await;
    let cfg = Config {
        json: Some(json.clone()),
        plot: Some(plot.clone()),
        ..config(&url)
    };
    let r = loadgen::run(cfg.clone()).await.expect("loadgen run");
    println!("{}", r.to_text());
    let t = &r.totals;
    assert!(t.sent > 100);
    // Subscribe dialect: each message reaches all 10 members of its room, the sender too.
    assert_eq!(t.expected, t.sent * 10);
    assert_eq!(t.received, t.expected);
    assert_eq!(
        (t.lost, t.duplicates, t.order_violations, t.misrouted),
        (0, 0, 0, 0)
    );
    assert_eq!(r.server_errors, 0);
    assert!(r.drained && r.clean());
    assert!(r.measured.latency.samples > 0);
    assert!(r.measured.deliveries_per_s > 0.0);
    assert!(r.warmup.sent > 0 && r.measured.counts.sent > 0);
    assert_eq!(r.warmup.sent + r.measured.counts.sent, t.sent);

    loadgen::write_outputs(&cfg, &r).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["totals"]["lost"], 0);
    assert_eq!(v["connect"]["connected"], 20);
    assert!(v["measured"]["latency"]["p99_us"].as_u64().unwrap() > 0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correct_server_join_dialect_is_clean() {
    let r = run_against(Fault::None, |c| {
        c.dialect = Dialect::Join;
        c.split_rooms = 1;
    })
    .await;
    let t = &r.totals;
    // Join dialect: the sender is skipped, 9 others receive.
    assert_eq!(t.expected, t.sent * 9);
    assert_eq!(t.received, t.expected);
    assert_eq!(
        (t.lost, t.duplicates, t.order_violations, t.misrouted),
        (0, 0, 0, 0)
    );
    assert!(r.clean());
    // --split-rooms 1: room 0 and room 1 apart, each half of the measured deliveries (two
    // senders at the same rate in each).
    let split = r.split_rooms.as_ref().expect("split reported");
    let (first, rest) = (split.latency_first.samples, split.latency_rest.samples);
    assert_eq!(first + rest, r.measured.latency.samples);
    assert!(
        first.abs_diff(rest) <= r.measured.latency.samples / 5,
        "{first} vs {rest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramp_reports_each_step() {
    let r = run_against(Fault::None, |c| {
        c.ramp = vec![20.0, 40.0];
        c.duration = Duration::from_millis(500);
    })
    .await;
    assert_eq!(r.steps.len(), 2);
    assert_eq!(
        r.steps
            .iter()
            .map(|s| s.rate_per_sender)
            .collect::<Vec<_>>(),
        [20.0, 40.0]
    );
    assert!(r.steps[1].counts.sent > r.steps[0].counts.sent);
    for s in &r.steps {
        assert!(s.latency.samples > 0);
        assert_eq!(
            s.sustainable,
            s.counts.lost == 0 && s.latency.p99_us < 100_000
        );
    }
    // Whether a step is sustainable depends on how loaded the test machine is; which one is
    // reported as the highest does not.
    let best = r
        .steps
        .iter()
        .filter(|s| s.sustainable)
        .map(|s| s.rate_per_sender)
        .reduce(f64::max);
    assert_eq!(r.highest_sustainable_rate, best);
    assert_eq!(
        r.measured.counts.sent,
        r.steps[0].counts.sent + r.steps[1].counts.sent
    );
    assert!(r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_reconnecting_clients_are_left_out_of_the_check() {
    // 16 non-senders: 4 stall (2 per room), half of the other 12 reconnect every 0.3 s.
    let r = run_against(Fault::None, |c| {
        c.stall_fraction = 0.25;
        c.reconnect_fraction = 0.5;
        c.reconnect_every = Duration::from_millis(300);
    })
    .await;
    let roles = r.roles.as_ref().expect("roles are reported");
    assert_eq!(roles.healthy_clients, 10);
    assert_eq!(roles.stalled.clients, 4);
    assert_eq!(roles.reconnecting.clients, 6);
    let t = &r.totals;
    // Each message is checked at the 5 healthy members of its room (2 senders, 3 receivers);
    // the stalled clients read nothing and would show as loss if they were counted.
    assert_eq!(t.expected, t.sent * 5);
    assert_eq!(t.received, t.expected);
    assert_eq!(
        (t.lost, t.duplicates, t.order_violations, t.misrouted),
        (0, 0, 0, 0)
    );
    let rc = &roles.reconnecting;
    assert!(
        rc.reconnects >= 6,
        "each reconnecting client came back: {rc:?}"
    );
    assert_eq!(rc.failed, 0);
    assert!(rc.received > 0);
    // The test server has no slow-consumer limit, so the stalled clients are still open.
    let st = &roles.stalled;
    assert_eq!((st.closed_by_server, st.still_open, st.received), (0, 4, 0));
    assert!(r.disconnects.is_empty(), "{:?}", r.disconnects);
    assert!(r.drained && r.clean());
    let text = r.to_text();
    assert!(text.contains("stalled clients closed by server: 0 (none)"));
    assert!(text.contains("the 10 healthy clients only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_server_shows_loss() {
    let r = run_against(Fault::Drop(7), lossy).await;
    let t = &r.totals;
    assert!(t.lost > 0, "loss detected");
    assert!(t.loss_pct > 5.0 && t.loss_pct < 30.0, "about 1/7 lost");
    assert_eq!((t.duplicates, t.order_violations, t.misrouted), (0, 0, 0));
    assert!(!r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicating_server_shows_duplicates() {
    let r = run_against(Fault::Duplicate(5), as_is).await;
    let t = &r.totals;
    assert!(t.duplicates > 0, "duplicates detected");
    assert_eq!((t.lost, t.order_violations, t.misrouted), (0, 0, 0));
    assert!(!r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_server_shows_order_violations() {
    let r = run_against(Fault::Reorder, lossy).await;
    let t = &r.totals;
    assert!(t.order_violations > 0, "reordering detected");
    // Reordering is not duplication or misrouting. (The last held message of each pair may
    // never be released, so some loss is expected.)
    assert_eq!((t.duplicates, t.misrouted), (0, 0));
    assert!(!r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misrouting_server_shows_misrouted() {
    let r = run_against(Fault::Misroute(10), lossy).await;
    let t = &r.totals;
    assert!(t.misrouted > 0, "misrouting detected");
    assert!(t.lost > 0, "the intended room missed them");
    assert_eq!((t.duplicates, t.order_violations), (0, 0));
    assert!(!r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_frames_are_counted_not_delivered() {
    let r = run_against(Fault::Errors(3), as_is).await;
    assert!(r.server_errors > 0);
    assert!(r.server_error_codes.get("limit").copied().unwrap_or(0) > 0);
    let t = &r.totals;
    // Errors that answer a message are taken as refusals (this server delivers those
    // messages all the same, so more arrives than is expected, which no figure shows).
    assert!(t.refused > 0);
    assert_eq!(
        (t.lost, t.duplicates, t.order_violations, t.misrouted),
        (0, 0, 0, 0)
    );
    assert!(!r.clean());
}

/// A send the server refuses (as during a Redis outage) reaches no one: it is counted as
/// refused, owed to no one, and the drain does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_sends_are_not_expected() {
    let r = run_against(Fault::Refuse(4), as_is).await;
    let t = &r.totals;
    assert!(t.refused > 0, "refusals counted");
    assert_eq!(t.refused, r.warmup.refused + r.measured.counts.refused);
    // Every 4th message (the four senders share the server's count).
    assert!(
        t.refused.abs_diff(t.sent / 4) <= 1,
        "{} of {}",
        t.refused,
        t.sent
    );
    assert_eq!(
        r.server_error_codes.get("backplane_unavailable"),
        Some(&t.refused)
    );
    // Each message that went out reaches all 10 members of its room.
    assert_eq!(t.expected, (t.sent - t.refused) * 10);
    assert_eq!(t.received, t.expected);
    assert_eq!(
        (t.lost, t.duplicates, t.order_violations, t.misrouted),
        (0, 0, 0, 0)
    );
    assert!(
        r.drained,
        "the drain ended without waiting for refused sends"
    );
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["totals"]["refused"], t.refused);
    assert_eq!(v["measured"]["refused"], r.measured.counts.refused);
    let line = format!("{:<20}{} (answered with an error", "refused", t.refused);
    assert!(r.to_text().contains(&line));
    // An error is still an error: the run is not clean.
    assert!(!r.clean());
}

#[tokio::test]
async fn refuses_impossible_client_counts_before_connecting() {
    // Port 9 (discard) on loopback: nothing should ever be contacted.
    let cfg = Config {
        urls: vec!["ws://127.0.0.1:9".to_string()],
        clients: 1_000_000_000,
        quiet: true,
        ..Config::default()
    };
    let err = loadgen::run(cfg)
        .await
        .expect_err("must refuse")
        .to_string();
    assert!(err.contains("will not allow"), "{err}");
}

#[tokio::test]
async fn reports_connect_failures() {
    // Bind then drop a listener to get a local port with nobody on it.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}");
    let err = loadgen::run(config(&url))
        .await
        .expect_err("nobody listens")
        .to_string();
    assert!(err.contains("20 x connect:"), "{err}");
}

#[tokio::test]
async fn envelope_needs_a_server_that_selects_the_subprotocol() {
    // The test server speaks version 1 only: it upgrades without selecting roomcast.v2.
    let url = start_server(Fault::None).await;
    let cfg = Config {
        envelope: true,
        ..config(&url)
    };
    let err = loadgen::run(cfg)
        .await
        .expect_err("no client may pass the handshake")
        .to_string();
    assert!(
        err.contains(
            "20 x handshake: server did not select subprotocol roomcast.v2 (selected: none)"
        ),
        "{err}"
    );
}

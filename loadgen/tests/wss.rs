//! loadgen over `wss://`: the fault tests' room server, speaking TLS only with a certificate
//! from a test CA of its own, must be checked exactly as over `ws://` when loadgen trusts
//! that CA (`--tls-ca`), refused by the handshake when it trusts another, and a `wss://` URL
//! with nothing to trust is refused before any connection.

mod support;

use std::process::Command;
use std::time::Duration;

use loadgen::{Config, Report};
use support::{start_server, start_tls_server, Fault, TestCa};

/// 20 clients in 2 rooms, 2 senders each at 50/s (as in tests/faults.rs), built as a plain
/// struct so no LOADGEN_* variable in the shell running the tests can change it.
fn config(url: &str) -> Config {
    Config {
        urls: vec![url.to_string()],
        clients: 20,
        rooms: 2,
        senders_per_room: 2,
        rate: 50.0,
        warmup: Duration::from_millis(300),
        duration: Duration::from_secs(1),
        drain: Duration::from_secs(3),
        settle: Duration::from_millis(100),
        quiet: true,
        ..Config::default()
    }
}

fn assert_clean(r: &Report) {
    println!("{}", r.to_text());
    assert_eq!(r.connect.connected, 20, "all clients connect");
    assert_eq!(r.connect.not_ready, 0, "all memberships confirmed");
    let t = &r.totals;
    assert!(t.sent > 100, "senders sent on schedule: {}", t.sent);
    assert_eq!(t.received, t.expected);
    assert_eq!(
        (t.lost, t.duplicates, t.order_violations, t.misrouted),
        (0, 0, 0, 0)
    );
    assert_eq!((r.server_errors, r.unparseable_frames), (0, 0));
    assert!(r.drained && r.clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_tls_ca_is_clean() {
    let ca = TestCa::new("clean");
    let url = start_tls_server(Fault::None, &ca).await;
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let cfg = Config {
        tls_ca: Some(ca.write_ca("clean")),
        ..config(&url)
    };
    let r = loadgen::run(cfg).await.expect("loadgen run over wss://");
    assert_clean(&r);
    // Subscribe dialect: each message reaches all 10 members of its room, the sender too.
    assert_eq!(r.totals.expected, r.totals.sent * 10);
    assert!(r.measured.latency.samples > 0);
    // The connect time includes the TLS handshake.
    assert!(r.connect.p50_ms > 0.0);
}

/// Closing a TLS connection (close_notify, shutdown) and connecting again, many times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_reconnecting_clients_come_back() {
    let ca = TestCa::new("reconnect");
    let url = start_tls_server(Fault::None, &ca).await;
    let cfg = Config {
        tls_ca: Some(ca.write_ca("reconnect")),
        reconnect_fraction: 0.5,
        reconnect_every: Duration::from_millis(300),
        ..config(&url)
    };
    let r = loadgen::run(cfg).await.expect("loadgen run over wss://");
    assert_clean(&r);
    let rc = &r.roles.as_ref().expect("roles are reported").reconnecting;
    assert_eq!(rc.clients, 8);
    assert!(rc.reconnects >= 8, "each came back at least once: {rc:?}");
    assert_eq!(rc.failed, 0, "{rc:?}");
    assert!(rc.received > 0);
}

/// The check is real: a server whose certificate another CA signed fails every handshake,
/// and a ws:// client gets nowhere with the TLS-only server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_the_wrong_ca_fails_the_handshake() {
    let (server_ca, other_ca) = (TestCa::new("server"), TestCa::new("other"));
    let url = start_tls_server(Fault::None, &server_ca).await;
    let cfg = Config {
        tls_ca: Some(other_ca.write_ca("other")),
        ..config(&url)
    };
    let err = loadgen::run(cfg)
        .await
        .expect_err("no handshake may succeed")
        .to_string();
    assert!(err.contains("20 x tls: invalid peer certificate"), "{err}");

    let plain = url.replacen("wss://", "ws://", 1);
    let err = loadgen::run(config(&plain))
        .await
        .expect_err("the server speaks TLS only")
        .to_string();
    assert!(err.contains("no client could connect"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_without_a_trust_is_refused_before_connecting() {
    // Port 9 (discard) on loopback: nothing should ever be contacted.
    let url = "wss://127.0.0.1:9/";
    let err = loadgen::run(config(url))
        .await
        .expect_err("must refuse")
        .to_string();
    assert!(
        err.starts_with("wss://127.0.0.1:9/: wss:// needs --tls-ca PATH")
            && err.contains("or --tls-insecure"),
        "{err}"
    );
    // Hostile clients stay plaintext-only.
    let cfg = Config {
        tls_insecure: true,
        flooders: 1,
        ..config(url)
    };
    let err = loadgen::run(cfg)
        .await
        .expect_err("must refuse")
        .to_string();
    assert!(
        err.contains("--flooders and --pingers speak ws:// only"),
        "{err}"
    );
    // A CA file that is not there.
    let cfg = Config {
        tls_ca: Some("/nonexistent/loadgen-ca.pem".into()),
        ..config(url)
    };
    let err = loadgen::run(cfg)
        .await
        .expect_err("must refuse")
        .to_string();
    assert!(
        err.starts_with("--tls-ca /nonexistent/loadgen-ca.pem: "),
        "{err}"
    );
    // A ws:// run needs no trust at all.
    let plain = start_server(Fault::None).await;
    let r = loadgen::run(config(&plain)).await.expect("loadgen run");
    assert!(r.clean());
}

/// The binary: the flags reach the run, and the refusal is what the command line prints.
#[test]
fn binary_takes_the_tls_flags() {
    let loadgen = env!("CARGO_BIN_EXE_loadgen");
    let out = Command::new(loadgen)
        .args(["--url", "wss://127.0.0.1:9", "--clients", "1", "-q"])
        .env_remove("LOADGEN_URL")
        .output()
        .expect("run loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("wss:// needs --tls-ca PATH") && stderr.contains("--tls-insecure"),
        "{stderr}"
    );
    let help = Command::new(loadgen).arg("--help").output().expect("help");
    // Words only: clap may wrap the lines.
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(help.contains("--tls-ca <PATH>") && help.contains("--tls-insecure"));
    assert!(help.contains("local benchmarks only"), "{help}");

    // A short run over wss:// with --tls-insecure, the server on a runtime of the test's own.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ca = TestCa::new("binary");
    let url = rt.block_on(start_tls_server(Fault::None, &ca));
    let json = ca.write_ca("binary").with_file_name("report.json");
    let out = Command::new(loadgen)
        .args(["--url", url.as_str(), "--tls-insecure", "-q"])
        .args(["--clients", "10", "--rooms", "2", "--senders-per-room", "1"])
        .args(["--rate", "20", "--warmup", "200ms", "--duration", "500ms"])
        .args(["--settle", "100ms", "--drain", "3s", "--json"])
        .arg(&json)
        .env_remove("LOADGEN_SERVER_PID")
        .env_remove("LOADGEN_TOKEN_SECRET")
        .output()
        .expect("run loadgen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("JSON");
    assert_eq!(v["connect"]["connected"], 10);
    assert_eq!(v["totals"]["lost"], 0);
    assert!(v["totals"]["sent"].as_u64().unwrap() > 0);
    assert_eq!(v["totals"]["received"], v["totals"]["expected"]);
}

//! The faulty room server from the tests, standalone, to watch loadgen catch faults by hand:
//!
//! ```text
//! cargo run --release -p loadgen --example fault_server -- 127.0.0.1:9001 drop:7
//! loadgen --url ws://127.0.0.1:9001 --clients 200 --rooms 4 --duration 3
//! ```
//!
//! Faults: `none`, `drop:N`, `dup:N`, `reorder`, `misroute:N`, `errors:N`, `refuse:N`.
//!
//! A third argument `tls=PATH` serves wss:// instead, with a certificate for 127.0.0.1 from a
//! fresh test CA whose certificate is written to PATH:
//!
//! ```text
//! cargo run --release -p loadgen --example fault_server -- 127.0.0.1:9443 none tls=/tmp/ca.pem
//! loadgen --url wss://127.0.0.1:9443 --tls-ca /tmp/ca.pem --clients 200 --rooms 4 --duration 3
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use support::{serve, Fault, TestCa};

fn parse_fault(s: &str) -> Option<Fault> {
    let (name, n) = match s.split_once(':') {
        Some((name, n)) => (name, Some(n.parse::<u64>().ok().filter(|&n| n > 0)?)),
        None => (s, None),
    };
    Some(match (name, n) {
        ("none", None) => Fault::None,
        ("reorder", None) => Fault::Reorder,
        ("drop", Some(n)) => Fault::Drop(n),
        ("dup", Some(n)) => Fault::Duplicate(n),
        ("misroute", Some(n)) => Fault::Misroute(n),
        ("errors", Some(n)) => Fault::Errors(n),
        ("refuse", Some(n)) => Fault::Refuse(n),
        _ => return None,
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bind = args.first().map_or("127.0.0.1:9001", String::as_str);
    let fault = parse_fault(args.get(1).map_or("none", String::as_str));
    let ca_path = match args.get(2).map(|a| a.strip_prefix("tls=")) {
        None => Ok(None),
        Some(Some(path)) if !path.is_empty() => Ok(Some(path)),
        Some(_) => Err(()),
    };
    let (Some(fault), Ok(ca_path)) = (fault, ca_path) else {
        eprintln!(
            "usage: fault_server [ADDR] [none|drop:N|dup:N|reorder|misroute:N|errors:N|refuse:N] \
             [tls=CA_PATH]"
        );
        std::process::exit(2);
    };
    let tls = ca_path.map(|path| {
        let ca = TestCa::new("fault_server");
        if let Err(e) = std::fs::write(path, &ca.ca_pem) {
            eprintln!("fault_server: {path}: {e}");
            std::process::exit(1);
        }
        println!("CA certificate written to {path} (loadgen --tls-ca {path})");
        ca.acceptor
    });
    let url = serve(bind, fault, tls).await;
    println!("fault server ({fault:?}) listening on {url}");
    std::future::pending::<()>().await;
}

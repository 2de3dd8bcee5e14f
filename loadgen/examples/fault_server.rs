//! The faulty room server from the tests, standalone, to watch loadgen catch faults by hand:
//!
//! ```text
//! cargo run --release -p loadgen --example fault_server -- 127.0.0.1:9001 drop:7
//! loadgen --url ws://127.0.0.1:9001 --clients 200 --rooms 4 --duration 3
//! ```
//!
//! Faults: `none`, `drop:N`, `dup:N`, `reorder`, `misroute:N`, `errors:N`, `refuse:N`.

#[path = "../tests/support/mod.rs"]
mod support;

use support::{start_server_on, Fault};

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
    let Some(fault) = parse_fault(args.get(1).map_or("none", String::as_str)) else {
        eprintln!(
            "usage: fault_server [ADDR] [none|drop:N|dup:N|reorder|misroute:N|errors:N|refuse:N]"
        );
        std::process::exit(2);
    };
    let url = start_server_on(bind, fault).await;
    println!("fault server ({fault:?}) listening on {url}");
    std::future::pending::<()>().await;
}

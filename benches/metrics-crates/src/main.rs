//! What one histogram observation costs on the fan-out path: roomcast's own
//! (`roomcast::metrics::Histogram`, 23 relaxed atomic buckets) beside `prometheus-client`'s
//! `Histogram` and the `metrics` facade with `metrics-exporter-prometheus`'s recorder, each
//! observed from one thread and from two at once (the fan-out runs on every worker thread).
//!
//!   cargo run --release --manifest-path benches/metrics-crates/Cargo.toml
//!
//! Prints ns per observation (wall time of the whole loop divided by observations per thread).

use std::sync::Arc;
use std::time::Instant;

const N: u64 = 5_000_000;

fn per_observation(threads: usize, observe: impl Fn(u64) + Send + Sync + 'static) -> f64 {
    let observe = Arc::new(observe);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let observe = Arc::clone(&observe);
            std::thread::spawn(move || {
                for i in 0..N {
                    // Fan-out times in µs spread over a few buckets.
                    observe(std::hint::black_box((i * 7 + t as u64) % 900 + 3));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    start.elapsed().as_nanos() as f64 / N as f64
}

fn main() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0])
        .expect("buckets")
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("one recorder");
    for threads in [1, 2] {
        let ours = Arc::new(roomcast::metrics::Histogram::default());
        let h = Arc::clone(&ours);
        let own = per_observation(threads, move |v| h.observe(v));

        let prom = Arc::new(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 22),
        ));
        let p = Arc::clone(&prom);
        let pc = per_observation(threads, move |v| p.observe(v as f64));

        let m = metrics::histogram!("fanout_us");
        let facade = per_observation(threads, move |v| m.record(v as f64));
        println!(
            "{threads} thread(s): roomcast {own:.1} ns, prometheus-client {pc:.1} ns, \
             metrics + exporter {facade:.1} ns per observation"
        );
    }
    // Keep the exporter's handle alive (and its upkeep honest) to the end.
    let _ = handle.render().len();
}

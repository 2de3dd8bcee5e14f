//! What a browser gets: the demo chat page, the JavaScript client, the dashboard, and the
//! dashboard's stream of figures (Server-Sent Events, one event a second).
//!
//! The files are built into the binary (`include_str!` of `web/`): no build step and no
//! network at run time. Pages are served with a Content-Security-Policy that allows scripts
//! from this origin only (no inline script runs), so even a message that slipped into the DOM
//! as HTML could not run code; the pages render every message as text anyway.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use hyper::Response;
use tokio::sync::watch;
use tokio::time::Interval;

use super::Shared;
use crate::metrics::{HistogramSnapshot, Process, Refusal, Snapshot};

/// Scripts and styles from this origin only; the page may open WebSockets and event streams
/// to its own host.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Dashboards streaming at once at most: each is a task and a JSON snapshot a second. Past it
/// the stream answers 503 (the page retries on its own).
pub(super) const MAX_VIEWERS: usize = 16;

/// A file of `web/` by its path, with its content type.
pub(super) fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "/" => (
            "text/html; charset=utf-8",
            include_str!("../../web/index.html"),
        ),
        "/demo.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../../web/demo.js"),
        ),
        "/roomcast.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../../web/roomcast.js"),
        ),
        "/dashboard" => (
            "text/html; charset=utf-8",
            include_str!("../../web/dashboard.html"),
        ),
        "/dashboard.js" => (
            "text/javascript; charset=utf-8",
            include_str!("../../web/dashboard.js"),
        ),
        _ => return None,
    })
}

/// A response body that is either whole or the dashboard's stream.
pub(super) type Reply = Response<http_body_util::Either<http_body_util::Full<Bytes>, Events>>;

/// A file of `web/` as a response.
pub(super) fn page(content_type: &'static str, body: &'static str) -> Reply {
    let mut res = Response::new(http_body_util::Either::Left(http_body_util::Full::new(
        Bytes::from_static(body.as_bytes()),
    )));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// The dashboard's stream, or 503 when [`MAX_VIEWERS`] are already watching.
pub(super) fn events(shared: &Shared, stop: watch::Receiver<bool>) -> Option<Reply> {
    let viewer = Viewer::take(&shared.viewers)?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = Events {
        shared: shared.clone(),
        stop,
        tick,
        fanout: HistogramSnapshot::default(),
        _viewer: viewer,
    };
    let mut res = Response::new(http_body_util::Either::Right(body));
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(res)
}

/// One dashboard watching; given back when its stream ends.
struct Viewer(Arc<AtomicUsize>);

impl Viewer {
    fn take(viewers: &Arc<AtomicUsize>) -> Option<Self> {
        viewers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_VIEWERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(viewers)))
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The dashboard's stream: one `data:` event a second with the node's figures, until the
/// viewer goes away or the node stops (checked every tick, so a drain waits at most a second
/// for it).
pub(super) struct Events {
    shared: Shared,
    stop: watch::Receiver<bool>,
    tick: Interval,
    /// The fan-out histogram at the last event: each event gives the last second's quantiles.
    fanout: HistogramSnapshot,
    _viewer: Viewer,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if *this.stop.borrow() {
            return Poll::Ready(None);
        }
        if this.tick.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        let m = this.shared.metrics.snapshot();
        let last_second = m.fanout_us.since(&this.fanout);
        this.fanout = m.fanout_us;
        let json = figures(&this.shared, &m, &last_second);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
            "data: {json}\n\n"
        ))))))
    }
}

/// One event's figures (`web/dashboard.js` reads them; counters are totals since start, the
/// page takes differences).
fn figures(shared: &Shared, m: &Snapshot, fanout: &HistogramSnapshot) -> serde_json::Value {
    let refused_by: serde_json::Map<String, serde_json::Value> = Refusal::ALL
        .iter()
        .map(|r| (r.label().to_owned(), m.refused_by[*r as usize].into()))
        .collect();
    let backplane = match (shared.config.redis.is_some(), shared.backplane.is_healthy()) {
        (false, _) => "none",
        (true, true) => "connected",
        (true, false) => "down",
    };
    let fanout_us = (fanout.count() > 0).then(|| {
        serde_json::json!({
            "p50": fanout.quantile(0.5),
            "p99": fanout.quantile(0.99),
            "count": fanout.count(),
        })
    });
    let process = Process::read_usage();
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    serde_json::json!({
        "at_ms": at_ms,
        "status": if shared.backplane.is_healthy() { "ok" } else { "degraded" },
        "connections": m.connections,
        "rooms": shared.registry.room_count(),
        "messages_in": m.messages_in,
        "deliveries": m.deliveries,
        "writes": m.writes,
        "frames_out": m.frames_out,
        "slow_consumers_closed": m.slow_closed,
        "dropped": m.dropped,
        "refused_by": refused_by,
        "backplane": backplane,
        "backplane_dropped": m.backplane_dropped,
        "fanout_us": fanout_us,
        "rss_bytes": process.resident_bytes,
        "cpu_seconds": process.cpu_seconds,
    })
}

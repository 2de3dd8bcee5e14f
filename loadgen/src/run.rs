//! The phases of one run, in the order `crate::run` calls them: resolve and check the targets,
//! start the clients and collect their connects, publish the plan and wait for readiness,
//! send on the schedule, drain, stop. Each phase returns what it measured; turning that into
//! the report is `Report::assemble`, which reads no clock and no /proc.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};

use crate::assemble::{ConnectPhase, CpuSample};
use crate::client::{
    assign_roles, client_task, instant_at, new_hist, now_ns, ClientArgs, ClientResult, Ctl, Hists,
    Outcome, PhaseSpec, Plan, Role, Schedule, Shared,
};
use crate::progress::Progress;
use crate::report::RssSample;
use crate::{sys, tls, ws, Config, ConfigError, Dialect, Error, Result};

/// Readiness probes are resent this often until every member has seen one.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Gap between publishing the schedule and its first slot, so every client has it.
const SCHEDULE_LEAD: Duration = Duration::from_millis(200);
/// How long stopped clients get to finish and hand in their counts.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The servers to connect to, resolved once.
pub(crate) struct Targets {
    urls: Vec<Arc<ws::WsUrl>>,
    addrs: Vec<SocketAddr>,
    /// Built once when any --url is `wss://`, shared by every connection.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Targets {
    pub(crate) fn urls(&self) -> &[Arc<ws::WsUrl>] {
        &self.urls
    }

    pub(crate) fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The TLS client configuration of the `wss://` URLs, if there are any.
    pub(crate) fn tls(&self) -> Option<tokio_rustls::TlsConnector> {
        self.tls.clone()
    }
}

/// Parses and resolves every --url; with a `wss://` one, builds the one TLS client
/// configuration of the run (reading --tls-ca) and checks each TLS server name.
pub(crate) async fn resolve(cfg: &Config) -> Result<Targets> {
    let mut t = Targets {
        urls: Vec::new(),
        addrs: Vec::new(),
        tls: None,
    };
    for u in &cfg.urls {
        let url = ws::WsUrl::parse(u)?;
        if url.tls {
            tls::server_name(&url)?;
            if t.tls.is_none() {
                // `validate` made sure there is a trust to build it from.
                let trust = cfg
                    .tls_trust()
                    .ok_or_else(|| ConfigError::NoTrust(u.clone()))?;
                t.tls = Some(tls::connector(&trust)?);
            }
        }
        let addr = tokio::net::lookup_host(url.socket_addr_string())
            .await
            .map_err(|source| Error::Resolve {
                url: u.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| Error::NoAddress { url: u.clone() })?;
        t.urls.push(Arc::new(url));
        t.addrs.push(addr);
    }
    Ok(t)
}

/// Refuses, before any connection, a run the OS could not hold or a server pid that is not
/// there. Raises this process's open-file limit as far as it goes.
pub(crate) fn preflight(cfg: &Config, t: &Targets) -> Result<()> {
    let mut per_dest: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (i, a) in t.addrs.iter().enumerate() {
        let n = cfg.clients / t.addrs.len() + usize::from(i < cfg.clients % t.addrs.len());
        *per_dest.entry(*a).or_insert(0) += n;
    }
    sys::check_port_range(per_dest.values().copied().max().unwrap_or(0))?;
    sys::raise_nofile(cfg.clients)?;
    match cfg.server_pids.iter().find(|&&p| !sys::process_exists(p)) {
        Some(&pid) => Err(Error::NoServerProcess(pid)),
        None => Ok(()),
    }
}

/// What every client task shares with the coordinator.
pub(crate) fn new_shared(cfg: &Config, threads: usize) -> Shared {
    let clients = cfg.clients;
    let rooms = cfg.rooms as u32;
    let n_phases = 1 + cfg.rates().len();
    // Big reads keep syscalls per delivery low, but 10k clients x 64 KiB would be 640 MiB,
    // so the buffer shrinks as the client count grows (frames larger than it still fit:
    // the buffer grows for them).
    let read_buf = ((256usize << 20) / clients).clamp(4 << 10, 64 << 10);
    // The connect phase as a whole is bounded too: twice the per-connection limit plus a
    // second per 500 clients.
    let connect_deadline =
        Instant::now() + cfg.connect_timeout * 2 + Duration::from_secs_f64(clients as f64 / 500.0);
    let (roles, reconnect_slots) = assign_roles(
        clients,
        rooms,
        cfg.senders_per_room as u32,
        cfg.stall_fraction,
        cfg.reconnect_fraction,
    );
    Shared {
        rooms,
        senders_per_room: cfg.senders_per_room as u32,
        dialect: cfg.dialect,
        envelope: cfg.envelope,
        resume: cfg.resume,
        room_prefix: cfg.room_prefix.clone(),
        split_rooms: cfg.split_rooms,
        payload: cfg.payload,
        n_phases,
        read_buf,
        connect_timeout: cfg.connect_timeout,
        connect_deadline,
        room_ready: (0..rooms).map(|_| AtomicU32::new(0)).collect(),
        shards: (0..(threads * 4).max(4))
            .map(|_| Mutex::new(Hists::new(n_phases)))
            .collect(),
        sent: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        received: AtomicU64::new(0),
        error_codes: Mutex::new(BTreeMap::new()),
        roles,
        reconnect_slots,
        reconnect_every: cfg.reconnect_every,
        reconnect_away: cfg.reconnect_away,
        reconnect_elsewhere: cfg.reconnect_elsewhere,
        // A day: tokens must outlive any run, and the server closes a connection at `exp`.
        tokens: cfg
            .token_secret
            .as_deref()
            .map(|s| crate::token::Minter::new(s, Duration::from_secs(86_400), &cfg.room_prefix)),
        // Set by `crate::run` from the resolved targets.
        tls: None,
    }
}

/// The client tasks and the coordinator's side of their channels.
pub(crate) struct Clients {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<ClientResult>>,
    ctl: watch::Sender<Ctl>,
    stop: watch::Sender<bool>,
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    progress: Progress,
}

/// What the clients handed in when they stopped, and what they recorded together.
pub(crate) struct Collected {
    pub results: Vec<ClientResult>,
    /// Client tasks that did not finish within the stop timeout.
    pub unstopped: u64,
    /// Per phase, merged over the histogram shards.
    pub latency: Vec<Histogram<u64>>,
    pub lag: Vec<Histogram<u64>>,
    /// Measured latency of rooms `split_rooms..` and `0..split_rooms`.
    pub split: [Histogram<u64>; 2],
    pub error_codes: BTreeMap<String, u64>,
}

impl Clients {
    /// Spawns one task per client; they start connecting at once.
    pub(crate) fn spawn(cfg: &Config, t: &Targets, shared: Shared) -> Clients {
        let shared = Arc::new(shared);
        let (ctl, ctl_rx) = watch::channel(Ctl::default());
        let (stop, stop_rx) = watch::channel(false);
        let (outcome_tx, outcomes) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(cfg.connect_concurrency));
        let mut progress = Progress::new(cfg.quiet);
        progress.stage("connect", cfg.clients as u64, "clients");
        // Per home target: every target, starting with it (`--reconnect-elsewhere`).
        let n = t.addrs.len();
        let rotations: Vec<Arc<Vec<_>>> = (0..n)
            .map(|home| {
                let order = (0..n).map(|k| (home + k) % n);
                Arc::new(
                    order
                        .map(|k| (t.addrs[k], Arc::clone(&t.urls[k])))
                        .collect(),
                )
            })
            .collect();
        let handles = (0..cfg.clients)
            .map(|i| {
                tokio::spawn(client_task(ClientArgs {
                    id: i as u32,
                    addr: t.addrs[i % t.addrs.len()],
                    url: Arc::clone(&t.urls[i % t.urls.len()]),
                    targets: Arc::clone(&rotations[i % t.addrs.len()]),
                    shared: Arc::clone(&shared),
                    connect_permits: Arc::clone(&permits),
                    outcomes: outcome_tx.clone(),
                    ctl: ctl_rx.clone(),
                    stop: stop_rx.clone(),
                }))
            })
            .collect();
        Clients {
            shared,
            handles,
            ctl,
            stop,
            outcomes,
            progress,
        }
    }

    /// Waits for every client's connect outcome (or the connect phase deadline). Fails when
    /// no client connected at all.
    pub(crate) async fn collect_connects(&mut self, cfg: &Config) -> Result<ConnectPhase> {
        let started = Instant::now();
        let clients = cfg.clients;
        let mut c = ConnectPhase {
            hist: new_hist(),
            failures: BTreeMap::new(),
            connected_ids: Vec::with_capacity(clients),
            total: Duration::ZERO,
            not_ready: 0,
        };
        let mut outcomes = 0usize;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let collect_deadline = self.shared.connect_deadline + Duration::from_secs(2);
        while outcomes < clients {
            tokio::select! {
                o = self.outcomes.recv() => {
                    let Some(o) = o else { break };
                    outcomes += 1;
                    c.record(o);
                }
                _ = tick.tick() => {}
                () = sleep_until(collect_deadline) => break,
            }
            let (ok, failed) = (c.connected_ids.len(), outcomes - c.connected_ids.len());
            self.progress
                .update(outcomes as u64, || format!("ok {ok}, failed {failed}"));
        }
        if outcomes < clients {
            *c.failures
                .entry("connect: no outcome by the connect phase deadline".into())
                .or_insert(0) += (clients - outcomes) as u64;
        }
        c.total = started.elapsed();
        if c.connected_ids.is_empty() {
            let _ = self.stop.send(true);
            return Err(Error::NoneConnected {
                urls: cfg.urls.join(", "),
                reasons: c.failure_list(),
            });
        }
        Ok(c)
    }

    /// Tells the clients who probes each room and how many deliveries a message should
    /// cause there.
    pub(crate) fn publish_plan(&self, cfg: &Config, connected_ids: &[u32]) -> Arc<Plan> {
        let plan = Arc::new(plan_for(cfg.dialect, &self.shared, connected_ids));
        self.ctl.send_modify(|c| c.plan = Some(Arc::clone(&plan)));
        plan
    }

    /// Probes each room until every member has seen a probe, or the readiness deadline
    /// passes. Returns how many members never confirmed.
    pub(crate) async fn await_readiness(&mut self, cfg: &Config, plan: &Plan) -> u64 {
        sleep(cfg.settle).await;
        let total_required: u64 = plan.required.iter().map(|&r| u64::from(r)).sum();
        let shared = Arc::clone(&self.shared);
        let count_ready = || -> u64 {
            shared
                .room_ready
                .iter()
                .zip(&plan.required)
                .map(|(r, &req)| u64::from(r.load(Ordering::Relaxed).min(req)))
                .sum()
        };
        self.progress.stage("ready", total_required, "clients");
        // 5 s, plus one per 2000 clients for the probes' fan-out.
        let probe_deadline = Instant::now()
            + Duration::from_secs(5)
            + Duration::from_secs_f64(cfg.clients as f64 / 2000.0);
        let mut round = 0u32;
        let mut next_probe = Instant::now();
        loop {
            let ready = count_ready();
            self.progress.update(ready, String::new);
            if ready >= total_required || Instant::now() >= probe_deadline {
                break;
            }
            if Instant::now() >= next_probe {
                round += 1;
                self.ctl.send_modify(|c| c.probe_round = round);
                next_probe = Instant::now() + PROBE_EVERY;
            }
            sleep(Duration::from_millis(20)).await;
        }
        let not_ready = total_required - count_ready();
        if not_ready > 0 {
            self.progress.note(&format!(
                "warning: {not_ready} clients never confirmed their room membership; sending anyway"
            ));
        }
        not_ready
    }

    /// Starts the senders: the schedule's first slot is SCHEDULE_LEAD from now.
    pub(crate) fn publish_schedule(&self, cfg: &Config) -> Arc<Schedule> {
        let t0 = now_ns() + SCHEDULE_LEAD.as_nanos() as u64;
        let total_senders = (cfg.rooms * cfg.senders_per_room).min(cfg.clients) as u32;
        let schedule = Arc::new(Schedule {
            phases: phases_from(cfg, t0),
            total_senders,
        });
        self.ctl
            .send_modify(|c| c.schedule = Some(Arc::clone(&schedule)));
        schedule
    }

    /// Shows progress while the schedule runs; samples CPU at the start of the first measured
    /// step and at the end of every step.
    pub(crate) async fn send(&mut self, cfg: &Config, schedule: &Schedule) -> Vec<CpuSample> {
        let t0 = schedule.phases[0].start_ns;
        self.progress
            .stage("run", (schedule.end_ns() - t0) / 1_000_000_000, "s");
        let measured = &schedule.phases[1..];
        let marks = std::iter::once(measured[0].start_ns).chain(measured.iter().map(|p| p.end_ns));
        let mut samples = Vec::with_capacity(measured.len() + 1);
        for mark in marks {
            loop {
                let now = now_ns();
                if now >= mark {
                    break;
                }
                self.show_sending(schedule, now);
                sleep_until(instant_at(mark.min(now + 1_000_000_000))).await;
            }
            samples.push(CpuSample::now(&cfg.server_pids));
        }
        samples
    }

    fn show_sending(&mut self, schedule: &Schedule, now: u64) {
        let sent = self.shared.sent.load(Ordering::Relaxed);
        let got = self.shared.received.load(Ordering::Relaxed);
        let exp = self.shared.expected.load(Ordering::Relaxed);
        let step = schedule.phase_of(now).unwrap_or(0);
        let elapsed = now.saturating_sub(schedule.phases[0].start_ns);
        self.progress.update(elapsed / 1_000_000_000, || {
            let what = if step == 0 {
                "warm-up".to_string()
            } else {
                format!("{}/s", schedule.phases[step].rate)
            };
            format!("{what} sent {sent} delivered {got}/{exp}")
        });
    }

    /// Waits up to --drain for every expected delivery; returns whether all arrived.
    pub(crate) async fn drain(&mut self, cfg: &Config) -> bool {
        let started = Instant::now();
        let deadline = started + cfg.drain;
        self.progress
            .stage("drain", cfg.drain.as_millis() as u64, "ms");
        loop {
            // `in_flight` first: a write that ends between the two loads has added to
            // `expected` before it leaves `in_flight`.
            let writing = self.shared.in_flight.load(Ordering::Acquire);
            let exp = self.shared.expected.load(Ordering::Acquire);
            let got = self.shared.received.load(Ordering::Relaxed);
            if got >= exp && writing == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let waited = started.elapsed().as_millis() as u64;
            self.progress
                .update(waited, || format!("waiting for {} deliveries", exp - got));
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every client and collects what each counted; a client that does not finish
    /// within STOP_TIMEOUT is aborted and counted as unstopped.
    pub(crate) async fn stop(mut self) -> Collected {
        let _ = self.stop.send(true);
        self.progress.finish();
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut results = Vec::with_capacity(self.handles.len());
        let mut unstopped = 0u64;
        for h in self.handles.drain(..) {
            let abort = h.abort_handle();
            match tokio::time::timeout_at(deadline, h).await {
                Ok(Ok(r)) => results.push(r),
                Ok(Err(_)) => unstopped += 1,
                Err(_) => {
                    abort.abort();
                    unstopped += 1;
                }
            }
        }
        self.progress.finish();
        let (latency, lag, split) = merged_hists(&self.shared);
        let error_codes = self
            .shared
            .error_codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Collected {
            results,
            unstopped,
            latency,
            lag,
            split,
            error_codes,
        }
    }
}

/// Per room: who probes, how many members must confirm, and how many deliveries a message
/// causes at the checked members (healthy, and resuming apart).
fn plan_for(dialect: Dialect, shared: &Shared, connected_ids: &[u32]) -> Plan {
    let rooms = shared.rooms;
    let mut members = vec![0u32; rooms as usize];
    // Members whose deliveries are checked: not stalled, not reconnecting.
    let mut healthy = vec![0u32; rooms as usize];
    // Reconnecting members that resume: nothing sent while they are away may be missed, so
    // from their first join on they are owed every message, like the healthy ones.
    let mut resuming = vec![0u32; rooms as usize];
    let mut prober = vec![u32::MAX; rooms as usize];
    for &id in connected_ids {
        let r = (id % rooms) as usize;
        members[r] += 1;
        match shared.role(id) {
            Role::Healthy => healthy[r] += 1,
            Role::Reconnecting { .. } if shared.resume => resuming[r] += 1,
            _ => {}
        }
        prober[r] = prober[r].min(id);
    }
    // The join dialect never echoes to the sender, so a room's sender cannot confirm its
    // own probe nor receive its own messages.
    let others = |m: u32| match dialect {
        Dialect::Subscribe => m,
        Dialect::Join => m.saturating_sub(1),
    };
    Plan {
        prober,
        required: members.iter().map(|&m| others(m)).collect(),
        // Senders are always healthy, so the join dialect's "not the sender" applies as is.
        recipients: healthy.iter().map(|&m| others(m)).collect(),
        // And never reconnect, so every resuming member hears every message.
        resume_recipients: resuming,
    }
}

/// The warm-up from `t0`, then one --duration step per rate.
fn phases_from(cfg: &Config, t0: u64) -> Vec<PhaseSpec> {
    let rates = cfg.rates();
    let warm_ns = cfg.warmup.as_nanos() as u64;
    let step_ns = cfg.duration.as_nanos() as u64;
    let mut phases = vec![PhaseSpec {
        start_ns: t0,
        end_ns: t0 + warm_ns,
        rate: rates[0],
    }];
    for (i, &rate) in rates.iter().enumerate() {
        let start = t0 + warm_ns + i as u64 * step_ns;
        phases.push(PhaseSpec {
            start_ns: start,
            end_ns: start + step_ns,
            rate,
        });
    }
    phases
}

type Merged = (
    Vec<Histogram<u64>>,
    Vec<Histogram<u64>>,
    [Histogram<u64>; 2],
);

fn merged_hists(shared: &Shared) -> Merged {
    use crate::assemble::merge;
    let n = shared.n_phases;
    let mut lat: Vec<Histogram<u64>> = (0..n).map(|_| new_hist()).collect();
    let mut lag: Vec<Histogram<u64>> = (0..n).map(|_| new_hist()).collect();
    let mut split = [new_hist(), new_hist()];
    for shard in &shared.shards {
        let h = shard.lock().unwrap_or_else(|e| e.into_inner());
        for p in 0..n {
            merge(&mut lat[p], &h.latency[p]);
            merge(&mut lag[p], &h.lag[p]);
        }
        for (all, one) in split.iter_mut().zip(&h.split) {
            merge(all, one);
        }
    }
    (lat, lag, split)
}

/// Samples the servers' RSS every --rss-every from the start of the run, in a task of its
/// own so a slow phase cannot skip samples.
pub(crate) struct RssSampler {
    pids: Vec<u32>,
    started: Instant,
    samples: Arc<Mutex<Vec<RssSample>>>,
    task: JoinHandle<()>,
}

impl RssSampler {
    /// `None` without --server-pid.
    pub(crate) fn start(pids: &[u32], every: Duration, started: Instant) -> Option<RssSampler> {
        if pids.is_empty() {
            return None;
        }
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (pids_, samples_) = (pids.to_vec(), Arc::clone(&samples));
        let task = tokio::spawn(async move {
            // Ticks stay on multiples of `every` from the start, so samples do not drift.
            let mut tick = tokio::time::interval_at(started, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let s = rss_sample(&pids_, started);
                if let Some(s) = s {
                    samples_.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                }
            }
        });
        Some(RssSampler {
            pids: pids.to_vec(),
            started,
            samples,
            task,
        })
    }

    /// Stops sampling and takes one last sample.
    pub(crate) fn finish(self) -> Vec<RssSample> {
        self.task.abort();
        let mut v = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()));
        v.extend(rss_sample(&self.pids, self.started));
        v
    }
}

/// RSS of all `pids` together; `None` when none of them can be read (all exited).
fn rss_sample(pids: &[u32], started: Instant) -> Option<RssSample> {
    let kbs: Vec<u64> = pids
        .iter()
        .filter_map(|&p| sys::proc_rss_kb(p).map(|(rss, _)| rss))
        .collect();
    (!kbs.is_empty()).then(|| RssSample {
        t_s: started.elapsed().as_secs_f64(),
        rss_kb: kbs.iter().sum(),
    })
}

//! Joining a room with history: the join answered with where the room is, and a resume
//! (`since`) replayed a chunk at a time, paced by the outbox, before the member goes live.
//!
//! The order a resuming member sees, and why it has no gap and no duplicate: every chunk but
//! the last is queued while the member is not in the room, so nothing live can come between
//! them; the last chunk, the `subscribed` answer and the join itself happen under the room's
//! history log ([`History::attach`]), the same lock every publish to the room takes to get its
//! offset and queue its fan-out. So each message is either in the replay or live, and the
//! replay comes first. A chunk is only taken when the outbox is empty and holds at most half
//! its bound, so a replay alone never makes a member a slow consumer.
//!
//! With offsets decided in Redis, this node's log only holds what it received while it had the
//! room open. When it does not reach back to the member's position, the room is pinned open
//! (so the node is subscribed and its log keeps filling), the room's Redis stream is read
//! after that subscribe took effect, the log is seeded with it (the two overlap, so nothing
//! falls between), and the resume goes on from the log as above.

use std::collections::VecDeque;
use std::future::Future as _;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::Session;
use crate::backplane::Fetched;
use crate::history::{Ask, Attach, Budget, History, Joining, Kept, Position, Stamp};
use crate::protocol::{self, ClientError, Since};
use crate::room::Pin as RoomPin;

/// Most messages in one chunk of a replay.
const CHUNK_FRAMES: usize = 64;

/// A resume not finished: the room, and the last offset the member has. Also a plain join
/// on a node whose log does not follow the room (offsets decided in Redis): it reads the
/// stream's newest entry so that the `subscribed` answer can say where the room is.
pub(super) struct Resume {
    room: String,
    /// The member's position; `None` for a plain join until the stream named the newest.
    from: Option<Position>,
    /// A plain join, not a resume: the answer says nothing of `recovered`.
    plain: bool,
    /// The room's Redis stream being read.
    fetching: Option<oneshot::Receiver<Fetched>>,
    /// The stream was read (or cannot be): a log that still does not reach back means the
    /// member is not recovered.
    asked: bool,
    /// Keeps the room open (and, with Redis, subscribed) until the member has joined.
    pin: Option<RoomPin>,
}

/// What one step of a resume did.
#[derive(PartialEq, Eq)]
enum Step {
    Joined,
    /// A chunk was queued; more to come.
    More,
    /// Waiting for the room's Redis stream.
    Asked,
}

impl Session {
    /// Joins `room` (the caller checked the grant), through its history when the node keeps
    /// one. With `since`, the member first gets what it missed (see the module doc).
    pub(super) fn subscribe(
        &mut self,
        room: &str,
        since: Option<Since<'_>>,
    ) -> Result<(), ClientError> {
        let history = self.shared.backplane.history().cloned();
        if self.resuming(room) {
            // Joining twice is a no-op: the resume in progress answers when it is done.
            return Ok(());
        }
        if self.held(room).is_some() {
            // A member already in the room has had everything since it joined, not
            // necessarily since `since`.
            let latest = history.and_then(|h| h.latest(room));
            self.answer(|| {
                protocol::room_reply("subscribed", room, latest.as_ref(), since.map(|_| false))
            });
            return Ok(());
        }
        self.check_join(room)?;
        let Some(history) = history else {
            self.join_now(room)?;
            self.answer(|| protocol::room_reply("subscribed", room, None, since.map(|_| false)));
            return Ok(());
        };
        let Some(since) = since else {
            return match history.attach(
                room,
                None,
                self.replay_budget(),
                (Ask::Cluster, self.opening(room)),
                |joining| self.joined(room, &joining, true),
            ) {
                Attach::Joined(result) => result,
                Attach::Behind => {
                    self.queue_resume(Resume {
                        room: room.to_owned(),
                        from: None,
                        plain: true,
                        fetching: None,
                        asked: false,
                        pin: None,
                    });
                    Ok(())
                }
                Attach::More(_) => Ok(()),
            };
        };
        self.queue_resume(Resume {
            room: room.to_owned(),
            from: Some(Position {
                epoch: Arc::from(since.epoch),
                offset: since.offset,
            }),
            plain: false,
            fetching: None,
            asked: false,
            pin: None,
        });
        Ok(())
    }

    /// Puts `resume` behind the others in progress and serves what can be served now.
    fn queue_resume(&mut self, resume: Resume) {
        self.rare_mut().resumes.push_back(resume);
        self.continue_resumes();
    }

    /// Serves the resumes in progress, a chunk at a time while the outbox is empty: called
    /// after a resume starts and whenever a flush has emptied the outbox.
    pub(super) fn continue_resumes(&mut self) {
        let Some(history) = self.shared.backplane.history().cloned() else {
            return;
        };
        while self.outbox.pending().0 == 0 {
            let Some(mut resume) = self.rare.as_mut().and_then(|r| r.resumes.pop_front()) else {
                break;
            };
            if resume.fetching.is_some() {
                // Waiting for Redis: the answer wakes the session (`poll_fetch`).
                self.rare_mut().resumes.push_front(resume);
                break;
            }
            match self.resume_step(&history, &mut resume) {
                Ok(Step::Joined) => {}
                Ok(step) => {
                    self.rare_mut().resumes.push_front(resume);
                    if step == Step::More {
                        // Come back when what was queued is written (a direct write leaves
                        // the outbox empty, and the loop goes on at once).
                        self.outbox.signal();
                    }
                }
                Err(e) => {
                    self.outbox.push(&e.to_frame(), &self.shared.metrics);
                }
            }
        }
        self.tidy_rare();
    }

    /// Which opening of `room` this node has (`None`: not open here).
    fn opening(&self, room: &str) -> Option<u64> {
        self.shared.registry.get(room).map(|r| r.opening())
    }

    /// Whether a resume of `room` is in progress.
    pub(super) fn resuming(&self, room: &str) -> bool {
        self.rare()
            .is_some_and(|rare| rare.resumes.iter().any(|r| r.room == room))
    }

    /// Drops a resume in progress (the client left the room before it finished).
    pub(super) fn cancel_resume(&mut self, room: &str) {
        self.retain_resumes(|name| name != room);
    }

    /// Keeps only the resumes in progress whose room passes `keep`.
    pub(super) fn retain_resumes(&mut self, keep: impl Fn(&str) -> bool) {
        if let Some(rare) = self.rare.as_mut() {
            rare.resumes.retain(|r| keep(&r.room));
        }
        self.tidy_rare();
    }

    /// One step of a resume: a chunk, the join, or the question to Redis.
    fn resume_step(&mut self, history: &History, resume: &mut Resume) -> Result<Step, ClientError> {
        let ask = if resume.asked {
            Ask::Nobody
        } else {
            Ask::Cluster
        };
        let step = history.attach(
            &resume.room,
            resume.from.as_ref(),
            self.replay_budget(),
            (ask, self.opening(&resume.room)),
            |joining| self.joined(&resume.room, &joining, resume.plain),
        );
        match step {
            Attach::Joined(result) => result.map(|()| Step::Joined),
            Attach::More(chunk) => {
                // `More` needs a position: only a resume, or a plain join that has one, gets it.
                if let Some(from) = resume.from.as_mut() {
                    let epoch = Arc::clone(&from.epoch);
                    if let Some(last) = chunk.last() {
                        from.offset = last.offset;
                    }
                    self.replay(&resume.room, &chunk, &epoch);
                }
                Ok(Step::More)
            }
            Attach::Behind => {
                // Pinned first: the subscribe it causes is queued to Redis before the read.
                let pin = self
                    .shared
                    .registry
                    .pin(&resume.room)
                    .map_err(|full| ClientError::Limit(full.to_string()))?;
                resume.pin = Some(pin);
                resume.asked = true;
                // From the member's own offset: the entry there shows the stream is the
                // member's history (same epoch), the rest is what it missed.
                // A plain join asks for the newest entry: where the room is.
                let first = resume.from.as_ref().map(|from| from.offset);
                resume.fetching = self.shared.backplane.fetch(&resume.room, first);
                Ok(Step::Asked)
            }
        }
    }

    /// The answer from Redis for the resume waiting on it, when it has come (polled as one of
    /// the session's wake-up sources).
    pub(super) fn poll_fetch(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Fetched>> {
        let waiting = self.rare.as_mut().and_then(|r| r.resumes.front_mut());
        let Some(rx) = waiting.and_then(|r| r.fetching.as_mut()) else {
            return std::task::Poll::Pending;
        };
        std::pin::Pin::new(rx).poll(cx).map(Result::ok)
    }

    /// Redis answered (`None`: it could not): seeds the room's log with the stream and goes on.
    pub(super) fn fetched(&mut self, answer: Option<Fetched>) {
        let (Some(history), Some(resume)) = (
            self.shared.backplane.history().cloned(),
            self.rare.as_mut().and_then(|r| r.resumes.front_mut()),
        ) else {
            return;
        };
        resume.fetching = None;
        let opening = self.shared.registry.get(&resume.room).map(|r| r.opening());
        if let (Some(stream), Some(opening)) = (answer, opening) {
            let stream: Vec<_> = stream.into_iter().map(|r| (r.stamp, r.frame)).collect();
            if resume.from.is_none() {
                // A plain join: the newest entry is where the member starts. None: the room
                // has no history yet; the member joins without a position, and the node's
                // log follows the room from here so later joins need not ask again.
                resume.from = stream.last().map(|(stamp, _)| Position {
                    epoch: Arc::clone(&stamp.epoch),
                    offset: stamp.offset,
                });
                if resume.from.is_none() {
                    history.follow((&resume.room, opening));
                }
            }
            if let Some(from) = &resume.from {
                history.seed((&resume.room, opening), from, &stream);
            }
        }
        self.continue_resumes();
    }

    /// Under the room's log: joins, queues the rest of the replay and the answer.
    /// A `plain` join answers without `recovered` and is not counted as a resume.
    fn joined(&mut self, room: &str, joining: &Joining, plain: bool) -> Result<(), ClientError> {
        self.join_now(room)?;
        if let Some(latest) = &joining.latest {
            self.replay(room, &joining.replay, &latest.epoch);
        }
        let recovered = joining.recovered.filter(|_| !plain);
        if let Some(recovered) = recovered {
            self.shared.metrics.add_resume(recovered);
        }
        self.answer(|| {
            protocol::room_reply("subscribed", room, joining.latest.as_ref(), recovered)
        });
        Ok(())
    }

    /// Queues kept messages for this member, in its format.
    fn replay(&self, room: &str, kept: &[Kept], epoch: &Arc<str>) {
        let envelope = self.envelope();
        for kept in kept {
            let frame = if envelope {
                let stamp = Stamp {
                    offset: kept.offset,
                    epoch: Arc::clone(epoch),
                };
                protocol::envelope_of(room, &kept.frame, Some(&stamp))
            } else {
                kept.frame.clone()
            };
            self.outbox.push(&frame, &self.shared.metrics);
        }
    }

    /// A chunk fills at most half the outbox bound, so with the outbox empty before it the
    /// replay alone never trips the slow-consumer verdict.
    fn replay_budget(&self) -> Budget {
        let config = &self.shared.config;
        Budget {
            frames: CHUNK_FRAMES.min((config.outbox_frames / 2) as usize).max(1),
            bytes: (config.outbox_bytes / 2) as usize,
        }
    }
}

/// The resumes a session has in progress, oldest first.
pub(super) type Resumes = VecDeque<Resume>;

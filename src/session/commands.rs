//! The session's commands: the two dialects run against the registry and the backplane.

use std::sync::Arc;

use bytes::Bytes;

use super::{Mode, Session};
use crate::auth::Op;
use crate::backplane::{BackplaneError, Others, Publish, Published};
use crate::frame::{self, FrameError, OpCode};
use crate::protocol::{self, ClientError, Command, Format, Id};
use crate::room::Room;

impl Session {
    pub(super) fn on_message(
        &mut self,
        opcode: OpCode,
        payload: &mut [u8],
    ) -> Result<(), FrameError> {
        if opcode == OpCode::Text && std::str::from_utf8(payload).is_err() {
            return Err(FrameError::InvalidUtf8);
        }
        if self.mode == Mode::Echo {
            self.outbox
                .push(&frame::encode(opcode, payload), &self.shared.metrics);
            return Ok(());
        }
        self.shared.metrics.add_message_in();
        let mut id = Id::Absent;
        let outcome = if opcode == OpCode::Binary {
            Err(ClientError::UnsupportedFrame)
        } else {
            protocol::decode(payload).and_then(|cmd| {
                id = cmd.id();
                self.on_command(cmd)
            })
        };
        if let Err(e) = outcome {
            let id = match id {
                Id::Given(id) if self.envelope() => Some(id),
                _ => None,
            };
            self.outbox.push(&e.to_frame_for(id), &self.shared.metrics);
        }
        Ok(())
    }

    /// Whether this connection chose envelope mode at its handshake.
    pub(super) fn envelope(&self) -> bool {
        self.outbox.format() == Format::Envelope
    }

    /// Queues an envelope-mode answer (never sent to version 1 clients).
    pub(super) fn answer(&self, frame: impl FnOnce() -> Bytes) {
        if self.envelope() {
            self.outbox.push(&frame(), &self.shared.metrics);
        }
    }

    /// In envelope mode, a send's `id` must be well formed before anything is sent, so an
    /// `ack` can always name it; elsewhere it is not read at all.
    fn check_id(&self, id: Id<'_>) -> Result<(), ClientError> {
        if id == Id::Invalid && self.envelope() {
            return Err(ClientError::BadField("id"));
        }
        Ok(())
    }

    /// Answers an accepted send that carried an `id`, in envelope mode, with the message's
    /// offset when the room has history.
    fn acknowledge(&self, id: Id<'_>, offset: Option<u64>) {
        if let Id::Given(id) = id {
            self.answer(|| protocol::ack(id, offset));
        }
    }

    fn on_command(&mut self, cmd: Command<'_>) -> Result<(), ClientError> {
        if self.awaiting_auth() && !matches!(cmd, Command::Auth { .. }) {
            // The first message must be `auth`: anything else is as good as no token.
            self.unauthorized("unauthorized");
            return Ok(());
        }
        match cmd {
            Command::Join { room, since } | Command::Subscribe { room, since } => {
                self.check(room, Op::Subscribe)?;
                self.subscribe(room, since)
            }
            Command::Leave { room } | Command::Unsubscribe { room } => {
                self.leave(room);
                self.cancel_resume(room);
                self.answer(|| protocol::room_reply("unsubscribed", room, None, None));
                Ok(())
            }
            Command::Chat { message, room, id } => {
                self.check_id(id)?;
                let published = self.chat(message, room)?;
                let offset = published.stamp.as_ref().map(|s| s.offset);
                self.published(published);
                self.acknowledge(id, offset);
                Ok(())
            }
            Command::SendMessage { room, message, id } => {
                self.check_id(id)?;
                self.check_room_name(room)?;
                self.check(room, Op::Publish)?;
                let published = self.publish(Publish {
                    held: self.held(room),
                    room,
                    message,
                    skip: None,
                    from: Some(&self.outbox),
                })?;
                let offset = published.stamp.as_ref().map(|s| s.offset);
                self.published(published);
                self.acknowledge(id, offset);
                Ok(())
            }
            Command::Presence { room } => {
                self.check_room_name(room)?;
                // Whoever may join a room may see how full it is.
                self.check(room, Op::Subscribe)?;
                self.presence(room);
                Ok(())
            }
            Command::Auth { token } => self.authenticate(token),
        }
    }

    /// Answers how many members `room` has: this node's count now, plus, across nodes, the
    /// others' as Redis holds them (at most about a second old). The answer from Redis comes
    /// on a task of its own that queues the reply, so the session never waits for it.
    fn presence(&self, room: &str) {
        let here = self.shared.registry.get(room).map_or(0, |r| r.len()) as u64;
        let metrics = Arc::clone(&self.shared.metrics);
        let others = match self.shared.backplane.presence(room) {
            Others::None => Some(0),
            Others::Unknown => None,
            Others::Asked(answer) => {
                let (outbox, room) = (Arc::clone(&self.outbox), room.to_owned());
                tokio::spawn(async move {
                    let reply = match answer.await {
                        Ok(others) => protocol::presence(&room, here + others, true),
                        Err(_) => protocol::presence(&room, here, false),
                    };
                    outbox.push(&reply, &metrics);
                });
                return;
            }
        };
        let reply = protocol::presence(room, here + others.unwrap_or(0), others.is_some());
        self.outbox.push(&reply, &metrics);
    }

    fn leave(&mut self, room: &str) {
        if let Some(held) = self.rooms.remove(room) {
            self.shared.registry.leave(&held, self.outbox.id());
        }
    }

    /// Dialect 1: to every other member of the chat room, or of the held room named.
    fn chat(&self, message: &str, room: Option<&str>) -> Result<Published, ClientError> {
        let held = match room {
            Some(name) => self.held(name).ok_or_else(|| {
                ClientError::NotInRoom(format!(
                    "chat to a room you have not joined: {}",
                    protocol::capped(name)
                ))
            })?,
            None => self
                .rooms
                .first()
                .ok_or_else(|| ClientError::NotInRoom("join a room before you chat".to_owned()))?,
        };
        self.check(held.id().as_str(), Op::Publish)?;
        self.publish(Publish {
            held: Some(held),
            room: held.id().as_str(),
            message,
            skip: Some(self.outbox.id()),
            from: Some(&self.outbox),
        })
    }

    /// Publishes `msg`; returns what it did here.
    fn publish(&self, msg: Publish<'_>) -> Result<Published, ClientError> {
        self.shared.backplane.publish(msg).map_err(|e| {
            if e == BackplaneError::Full {
                self.shared.metrics.add_backplane_refused();
            }
            ClientError::BackplaneUnavailable(protocol::capped(msg.room).to_owned())
        })
    }

    /// Charges the fan-out budget, and keeps what is left of a large room's broadcast: the
    /// session serves it a slice per turn of its loop and reads no further message until it
    /// is done, so this sender's messages keep their order.
    fn published(&mut self, published: Published) {
        self.charge_fanout(published.deliveries);
        if published.rest.is_some() {
            self.shared.metrics.add_fanout_yield();
        }
        if let Some(rest) = published.rest {
            self.rare_mut().fanout = Some(rest);
        }
    }

    pub(super) fn held(&self, name: &str) -> Option<&Arc<Room>> {
        self.rooms.iter().find(|r| r.id().as_str() == name)
    }

    fn check_room_name(&self, name: &str) -> Result<(), ClientError> {
        let max = self.shared.config.max_room_name;
        if name.len() > max {
            return Err(ClientError::Limit(format!(
                "room name is longer than {max} bytes"
            )));
        }
        Ok(())
    }

    /// Joins `name` at once, without history (tests reach the registry through this).
    #[cfg(test)]
    pub(super) fn join(&mut self, name: &str) -> Result<(), ClientError> {
        if self.held(name).is_some() {
            return Ok(());
        }
        self.check_join(name)?;
        self.join_now(name)
    }

    /// What a join must pass before it starts: the name's length and the connection's room
    /// cap (rooms being resumed count).
    pub(super) fn check_join(&self, name: &str) -> Result<(), ClientError> {
        self.check_room_name(name)?;
        let max = self.shared.config.max_rooms_per_connection;
        let resuming = self.rare().map_or(0, |r| r.resumes.len());
        if self.rooms.len() + resuming >= max {
            return Err(ClientError::Limit(format!(
                "a connection may hold at most {max} rooms"
            )));
        }
        Ok(())
    }

    /// Adds this connection to the room's members.
    pub(super) fn join_now(&mut self, name: &str) -> Result<(), ClientError> {
        let room = self
            .shared
            .registry
            .join(name, &self.outbox)
            .map_err(|full| ClientError::Limit(full.to_string()))?;
        self.rooms.push(room);
        Ok(())
    }
}

//! What a connection may do: auth off (everything), waiting for its first message `auth`, or
//! granted by a token (or anonymously). One enum, so the session cannot be in two of these.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::moment::Moment;
use super::Session;
use crate::auth::{self, Grants, Identity, Op};
use crate::frame::close_code;
use crate::protocol::{self, ClientError};
use crate::users::UserSlot;

/// The connection's standing, decided at the handshake and changed by `auth` messages.
pub(crate) enum Access {
    /// Auth is off: everything is allowed, as in the original servers.
    Open,
    /// A token is required and none came with the handshake: the first message must be `auth`,
    /// before this instant.
    Pending(Instant),
    /// A token proved who the connection is, or (auth optional) it has the anonymous grants.
    /// Boxed: with auth off every connection is `Open`, and this enum is paid by every idle
    /// connection.
    Granted(Box<Grant>),
}

/// What a granted connection may do, until when, and for which user it is counted.
pub(crate) struct Grant {
    pub(crate) grants: Arc<Grants>,
    pub(crate) expires: Option<Instant>,
    pub(crate) user: Option<UserSlot>,
}

impl Grant {
    /// The grant of a verified `identity` (its user slot is taken by the caller).
    pub(crate) fn of(identity: &Identity, user: Option<UserSlot>) -> Self {
        Self {
            grants: Arc::clone(&identity.grants),
            expires: identity.expires.map(expiry),
            user,
        }
    }
}

/// The instant a Unix-time `exp` falls on.
fn expiry(exp: u64) -> Instant {
    Instant::now() + Duration::from_secs(exp.saturating_sub(auth::unix_now()))
}

impl Access {
    /// The next instant this standing ends at: the auth deadline, or the token's expiry.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self {
            Access::Open => None,
            Access::Pending(deadline) => Some(*deadline),
            Access::Granted(grant) => grant.expires,
        }
    }
}

/// Why a verified token still cannot be used on this connection.
enum SlotError {
    /// A refresh for a different user than the connection's.
    OtherUser,
    /// The user holds `--max-connections-per-user` connections already.
    TooMany,
}

impl Session {
    /// `Err(forbidden)` unless the connection may do `op` in `room`.
    pub(super) fn check(&self, room: &str, op: Op) -> Result<(), ClientError> {
        let allowed = match &self.access {
            Access::Open => true,
            Access::Pending(_) => false,
            Access::Granted(grant) => grant.grants.allows(room, op),
        };
        if allowed {
            return Ok(());
        }
        let verb = match op {
            Op::Subscribe => "subscribe to",
            Op::Publish => "publish to",
        };
        Err(ClientError::Forbidden(
            verb,
            protocol::capped(room).to_owned(),
        ))
    }

    /// True while the first message must still be `auth`.
    pub(super) fn awaiting_auth(&self) -> bool {
        matches!(self.access, Access::Pending(_))
    }

    /// The access deadline passed: no `auth` in time, or the token expired.
    pub(super) fn access_expired(&mut self) {
        let reason = match self.access {
            Access::Pending(_) => "unauthorized",
            _ => "token expired",
        };
        self.unauthorized(reason);
    }

    pub(super) fn unauthorized(&mut self, reason: &str) {
        self.refuse_input(close_code::UNAUTHORIZED, reason);
    }

    /// A first-message `auth`, or a refresh. A refused token closes with 4001; a refresh must
    /// name the same user, replaces the grants and leaves the rooms no longer granted.
    pub(super) fn authenticate(&mut self, token: &str) -> Result<(), ClientError> {
        let Some(verifier) = self.shared.verifier.clone() else {
            return Err(ClientError::UnknownType("auth".to_owned()));
        };
        let identity = match verifier.verify(token) {
            Ok(identity) => identity,
            Err(e) => {
                tracing::debug!(conn = self.outbox.id().0, "{e}");
                self.unauthorized("unauthorized");
                return Ok(());
            }
        };
        let user = match self.user_slot(&identity) {
            Ok(user) => user,
            Err(SlotError::OtherUser) => {
                self.unauthorized("a refresh must be for the same user");
                return Ok(());
            }
            Err(SlotError::TooMany) => {
                self.refuse_input(close_code::POLICY, "too many connections for this user");
                return Ok(());
            }
        };
        self.access = Access::Granted(Box::new(Grant::of(&identity, user)));
        self.access_deadline = self.access.deadline().map(Moment::of);
        self.leave_ungranted();
        Ok(())
    }

    /// The user slot the new identity is counted in: the one held already on a refresh (which
    /// must be for the same user), or a new one.
    fn user_slot(&mut self, identity: &Identity) -> Result<Option<UserSlot>, SlotError> {
        let held = match &mut self.access {
            Access::Granted(grant) => grant.user.take(),
            _ => None,
        };
        match (held, &identity.user) {
            (Some(slot), Some(user)) if slot.user() == user => Ok(Some(slot)),
            (Some(_), _) => Err(SlotError::OtherUser),
            (None, Some(user)) => self
                .shared
                .users
                .add(user, &self.outbox)
                .map(Some)
                .map_err(|_| SlotError::TooMany),
            (None, None) => Ok(None),
        }
    }

    /// After new grants: leaves every held room they no longer allow subscribing to, and
    /// drops such rooms' resumes in progress.
    fn leave_ungranted(&mut self) {
        let Access::Granted(grant) = &self.access else {
            return;
        };
        let grants = Arc::clone(&grant.grants);
        self.retain_resumes(|room| grants.allows(room, Op::Subscribe));
        let id = self.outbox.id();
        let registry = self.shared.registry.clone();
        self.rooms.retain(|room| {
            let keep = grants.allows(room.id().as_str(), Op::Subscribe);
            if !keep {
                registry.leave(room, id);
            }
            keep
        });
    }
}

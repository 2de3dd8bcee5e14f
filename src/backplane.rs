//! The bus a published message travels on before fan-out. In-process by default: the message is
//! framed once and broadcast to the local room. Sessions only call [`Backplane::publish`]; they
//! never know which bus runs.

use std::sync::Arc;

use crate::frame;
use crate::metrics::Metrics;
use crate::outbox::ConnId;
use crate::room::{Registry, Room};

/// Why a message could not be handed to the bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackplaneError {
    #[error("backplane unavailable")]
    Unavailable,
}

/// A message to publish: where it goes and whom it skips.
#[derive(Clone, Copy)]
pub struct Publish<'a> {
    /// The room handle when the sender holds the room: spares a registry lookup.
    pub held: Option<&'a Arc<Room>>,
    pub room: &'a str,
    pub message: &'a str,
    /// The sending connection, skipped at delivery (dialect 1's `chat`).
    pub skip: Option<ConnId>,
}

/// Cheap-to-clone handle to the node's bus.
#[derive(Clone)]
pub struct Backplane {
    registry: Registry,
    metrics: Arc<Metrics>,
}

impl Backplane {
    pub fn local(registry: Registry, metrics: Arc<Metrics>) -> Self {
        Self { registry, metrics }
    }

    /// True while messages can flow; `/healthz` reports "degraded" otherwise.
    pub fn is_healthy(&self) -> bool {
        true
    }

    pub fn publish(&self, msg: Publish<'_>) -> Result<(), BackplaneError> {
        let frame = frame::text(msg.message);
        match msg.held {
            Some(room) => {
                room.broadcast(&frame, msg.skip, &self.metrics);
            }
            None => {
                if let Some(room) = self.registry.get(msg.room) {
                    room.broadcast(&frame, msg.skip, &self.metrics);
                }
            }
        }
        Ok(())
    }
}

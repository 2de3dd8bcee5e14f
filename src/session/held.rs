//! The rooms a session holds, in join order (the first is dialect 1's chat room).
//!
//! A boxed slice rather than a `Vec`: 16 bytes in the session instead of 24, and one room is
//! an 8-byte allocation where a `Vec` grows to room for four (32 bytes). Both are paid by every
//! idle connection; joins and leaves, which rebuild the slice, are rare next to messages.

use std::sync::Arc;

use crate::room::Room;

#[derive(Default)]
pub(super) struct Held(Box<[Arc<Room>]>);

impl Held {
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, Arc<Room>> {
        self.0.iter()
    }

    /// The first room joined and still held.
    pub(super) fn first(&self) -> Option<&Arc<Room>> {
        self.0.first()
    }

    pub(super) fn push(&mut self, room: Arc<Room>) {
        self.rebuild(|rooms| rooms.push(room));
    }

    /// Removes the room named `name`, if held.
    pub(super) fn remove(&mut self, name: &str) -> Option<Arc<Room>> {
        let at = self.0.iter().position(|r| r.id().as_str() == name)?;
        let mut removed = None;
        self.rebuild(|rooms| removed = Some(rooms.remove(at)));
        removed
    }

    /// Keeps the rooms `keep` says to, in order.
    pub(super) fn retain(&mut self, keep: impl FnMut(&Arc<Room>) -> bool) {
        self.rebuild(|rooms| rooms.retain(keep));
    }

    fn rebuild(&mut self, change: impl FnOnce(&mut Vec<Arc<Room>>)) {
        let mut rooms = Vec::from(std::mem::take(&mut self.0));
        change(&mut rooms);
        self.0 = rooms.into_boxed_slice();
    }
}

impl IntoIterator for Held {
    type Item = Arc<Room>;
    type IntoIter = std::vec::IntoIter<Arc<Room>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

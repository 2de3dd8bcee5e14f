//! A room's member list as a persistent 16-ary tree: a join or a leave copies one path from the
//! root to a leaf (at most 16 entries per level, five levels for a million members) instead of
//! the whole list, and every snapshot a broadcast still holds stays valid and unchanged.
//!
//! The shape is dense and left-packed, as in Clojure's persistent vector: member `i` sits at the
//! leaf path spelled by the base-16 digits of `i`, every leaf and branch is full except the last
//! one of its level, and the list has no holes. A leave moves the last member into the hole
//! (`swap_remove`), so order is not join order; fan-out does not need it to be.
//!
//! Why 16: a change copies about `16 × (height + 1)` entries and bumps as many reference counts
//! (80 for 100,000 members, 32 for 200); 32 would copy 128 against 39, and 8 was measured no
//! faster (more levels, more allocations, more dependent loads). Each node is one allocation
//! holding its entries inline (`Arc<[T]>`), so fan-out pays one pointer chase per 16 members.

use std::sync::Arc;

use super::Member;
use crate::outbox::ConnId;

const BITS: u32 = 4;
const WIDTH: usize = 1 << BITS;
const MASK: usize = WIDTH - 1;

/// A subtree; cloning one is a reference-count bump.
#[derive(Clone)]
enum Node {
    /// 1 to `WIDTH` members.
    Leaf(Arc<[Member]>),
    /// 1 to `WIDTH` children, all of the same height.
    Branch(Arc<[Node]>),
}

/// An immutable member list; every change returns a new roster sharing all untouched nodes.
#[derive(Clone, Default)]
pub(crate) struct Roster {
    root: Option<Node>,
    len: usize,
    /// Branch levels above the leaves (a root leaf has height 0).
    height: u32,
}

impl Roster {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// How many members a tree of this height holds when full.
    fn capacity(height: u32) -> usize {
        1usize << (BITS * (height + 1))
    }

    /// `member` appended at index `len`.
    pub(crate) fn push(&self, member: Member) -> Self {
        let (root, height) = match &self.root {
            None => (single_path(0, member), 0),
            Some(root) if self.len == Self::capacity(self.height) => {
                let sibling = single_path(self.height, member);
                let root = Node::Branch(Arc::from([root.clone(), sibling]));
                (root, self.height + 1)
            }
            Some(root) => (push_at(root, self.height, self.len, member), self.height),
        };
        Self {
            root: Some(root),
            len: self.len + 1,
            height,
        }
    }

    /// The member at `index` replaced by `member`. `index < len`.
    pub(crate) fn set(&self, index: usize, member: Member) -> Self {
        debug_assert!(index < self.len);
        let root = self
            .root
            .as_ref()
            .map(|r| set_at(r, self.height, index, member));
        Self { root, ..*self }
    }

    /// The last member removed, and that member. `None` when empty.
    pub(crate) fn pop(&self) -> Option<(Self, Member)> {
        let (mut root, last) = pop_last(self.root.as_ref()?);
        let mut height = self.height;
        // Dense shape: a root branch left with one child is one level too tall.
        while let Some(Node::Branch(children)) = &root {
            if children.len() != 1 || height == 0 {
                break;
            }
            root = Some(children[0].clone());
            height -= 1;
        }
        let len = self.len - 1;
        Some((Self { root, len, height }, last))
    }

    /// The member at `index` removed, the last member moved into its place. Returns the new
    /// roster and the id of the member that moved (now at `index`), if one did. `None` when
    /// `index` is out of range.
    pub(crate) fn swap_remove(&self, index: usize) -> Option<(Self, Option<ConnId>)> {
        if index >= self.len {
            return None;
        }
        let (popped, last) = self.pop()?;
        if index == popped.len {
            return Some((popped, None));
        }
        let moved = last.id;
        Some((popped.set(index, last), Some(moved)))
    }

    /// The member at `index`.
    #[cfg(test)]
    pub(crate) fn get(&self, index: usize) -> Option<&Member> {
        if index >= self.len {
            return None;
        }
        let mut node = self.root.as_ref()?;
        let mut level = self.height;
        loop {
            match node {
                Node::Leaf(members) => return members.get(index & MASK),
                Node::Branch(children) => {
                    node = children.get(digit(index, level))?;
                    level -= 1;
                }
            }
        }
    }

    /// Calls `visit` with each leaf's members, in index order, from the leaf holding member
    /// `start` on, until `visit` returns false. Returns the index after the last visited leaf.
    pub(crate) fn leaves_from(
        &self,
        start: usize,
        visit: &mut dyn FnMut(&[Member]) -> bool,
    ) -> usize {
        match &self.root {
            Some(root) if start < self.len => walk(root, self.height, 0, start, visit).0,
            _ => self.len,
        }
    }

    /// Every member, in index order.
    #[cfg(test)]
    pub(crate) fn for_each(&self, mut visit: impl FnMut(&Member)) {
        self.leaves_from(0, &mut |leaf| {
            leaf.iter().for_each(&mut visit);
            true
        });
    }
}

/// The child slot of `index` in a branch at `level` (leaves are level 0).
fn digit(index: usize, level: u32) -> usize {
    (index >> (BITS * level)) & MASK
}

/// A path of single-child branches down to a leaf holding `member`.
fn single_path(height: u32, member: Member) -> Node {
    let mut node = Node::Leaf(Arc::from([member]));
    for _ in 0..height {
        node = Node::Branch(Arc::from([node]));
    }
    node
}

/// `items` with the entry at `slot` replaced by `with`, or `with` appended when `slot` is
/// `items.len()`; one allocation of the exact size.
fn replaced<T: Clone>(items: &[T], slot: usize, with: T) -> Arc<[T]> {
    let mut with = Some(with);
    let len = items.len().max(slot + 1);
    (0..len)
        .map(|i| match items.get(i) {
            Some(_) if i == slot => with.take().expect("one slot is replaced"),
            Some(item) => item.clone(),
            None => with.take().expect("one slot is appended"),
        })
        .collect()
}

fn push_at(node: &Node, level: u32, index: usize, member: Member) -> Node {
    match node {
        Node::Leaf(members) => Node::Leaf(replaced(members, members.len(), member)),
        Node::Branch(children) => {
            let slot = digit(index, level);
            let child = match children.get(slot) {
                Some(child) => push_at(child, level - 1, index, member),
                None => single_path(level - 1, member),
            };
            Node::Branch(replaced(children, slot, child))
        }
    }
}

fn set_at(node: &Node, level: u32, index: usize, member: Member) -> Node {
    match node {
        Node::Leaf(members) => Node::Leaf(replaced(members, index & MASK, member)),
        Node::Branch(children) => {
            let slot = digit(index, level);
            let child = set_at(&children[slot], level - 1, index, member);
            Node::Branch(replaced(children, slot, child))
        }
    }
}

/// `node` without its last member (`None` when that was its only one), and that member.
fn pop_last(node: &Node) -> (Option<Node>, Member) {
    match node {
        Node::Leaf(members) => {
            let (last, rest) = members.split_last().expect("a leaf holds a member");
            let rest = (!rest.is_empty()).then(|| Node::Leaf(Arc::from(rest)));
            (rest, last.clone())
        }
        Node::Branch(children) => {
            let (tail, rest) = children.split_last().expect("a branch holds a child");
            let (tail, last) = pop_last(tail);
            let node = match tail {
                Some(tail) => Some(Node::Branch(replaced(children, rest.len(), tail))),
                None if rest.is_empty() => None,
                None => Some(Node::Branch(Arc::from(rest))),
            };
            (node, last)
        }
    }
}

/// Visits the leaves under `node` (whose first member has index `first`) from `start` on.
/// Returns the index after the last leaf visited, and whether to go on.
fn walk(
    node: &Node,
    level: u32,
    first: usize,
    start: usize,
    visit: &mut dyn FnMut(&[Member]) -> bool,
) -> (usize, bool) {
    match node {
        Node::Leaf(members) => (first + members.len(), visit(members)),
        Node::Branch(children) => {
            let span = 1usize << (BITS * level);
            let skip = start.saturating_sub(first) / span;
            let mut end = first + skip * span;
            for child in &children[skip.min(children.len())..] {
                let (after, go_on) = walk(child, level - 1, end, start, visit);
                end = after;
                if !go_on {
                    return (end, false);
                }
            }
            (end, true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Limits, Outbox, SlowConsumer};

    fn member(id: u64) -> Member {
        let limits = Arc::new(Limits {
            max_frames: 1,
            max_bytes: 1,
            policy: SlowConsumer::Close,
            direct: true,
            metrics: Arc::default(),
        });
        Member {
            id: ConnId(id),
            outbox: Arc::new(Outbox::new(ConnId(id), limits)),
        }
    }

    fn ids(roster: &Roster) -> Vec<u64> {
        let mut out = Vec::new();
        roster.for_each(|m| out.push(m.id.0));
        out
    }

    /// The roster agrees with a plain `Vec` doing the same pushes and swap-removes, through
    /// every height change, and every older snapshot still reads as it did.
    #[test]
    fn matches_a_vec_through_growth_and_shrinking() {
        let mut model: Vec<u64> = Vec::new();
        let mut roster = Roster::default();
        let mut kept: Vec<(Roster, Vec<u64>)> = Vec::new();
        let mut seed = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Grow past two height changes (to about 3,000 members: 16 and 256), then shrink to empty.
        for step in 0..12_000u64 {
            let grow = if step < 6_000 {
                next() % 4 != 0
            } else {
                next() % 4 == 0
            };
            if grow || model.is_empty() {
                roster = roster.push(member(step));
                model.push(step);
            } else {
                let at = (next() % model.len() as u64) as usize;
                let (next_roster, moved) = roster.swap_remove(at).expect("in range");
                model.swap_remove(at);
                assert_eq!(moved.map(|id| id.0), model.get(at).copied());
                roster = next_roster;
            }
            assert_eq!(roster.len(), model.len());
            if step % 997 == 0 {
                assert_eq!(ids(&roster), model);
                kept.push((roster.clone(), model.clone()));
            }
        }
        while let Some((mut rest, _)) = roster.pop() {
            std::mem::swap(&mut roster, &mut rest);
            model.pop();
        }
        assert!(model.is_empty() && roster.root.is_none() && roster.height == 0);
        for (old, expected) in kept {
            assert_eq!(
                ids(&old),
                expected,
                "a snapshot changed after it was replaced"
            );
            for (i, id) in expected.iter().enumerate() {
                assert_eq!(old.get(i).map(|m| m.id.0), Some(*id));
            }
        }
    }

    #[test]
    fn height_is_the_least_that_holds_the_members() {
        let three_levels = WIDTH * WIDTH * WIDTH;
        let mut roster = Roster::default();
        for i in 0..=three_levels as u64 {
            roster = roster.push(member(i));
        }
        assert_eq!(
            roster.height, 3,
            "one past three full levels needs a fourth"
        );
        roster = roster.pop().expect("not empty").0;
        assert_eq!(roster.height, 2, "three full levels fit in three");
        assert_eq!(roster.swap_remove(three_levels).map(|(r, _)| r.len()), None);
    }

    #[test]
    fn leaves_from_starts_at_the_leaf_holding_start_and_stops_when_told() {
        let mut roster = Roster::default();
        for i in 0..1_000u64 {
            roster = roster.push(member(i));
        }
        for start in [0, WIDTH - 1, WIDTH, WIDTH * WIDTH - 1, WIDTH * WIDTH, 999] {
            let mut seen = Vec::new();
            let end = roster.leaves_from(start, &mut |leaf| {
                seen.extend(leaf.iter().map(|m| m.id.0));
                true
            });
            assert_eq!(end, 1_000);
            let first = (start / WIDTH * WIDTH) as u64;
            assert_eq!(seen, (first..1_000).collect::<Vec<_>>(), "from {start}");
        }
        let mut leaves = 0;
        let end = roster.leaves_from(100, &mut |_| {
            leaves += 1;
            leaves < 3
        });
        let first = 100 / WIDTH * WIDTH;
        let three_leaves = (3, first + 3 * WIDTH);
        assert_eq!((leaves, end), three_leaves, "from the leaf holding 100");
        assert_eq!(roster.leaves_from(1_000, &mut |_| unreachable!()), 1_000);
    }
}

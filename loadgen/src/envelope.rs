//! Envelope mode (`--envelope`, the `roomcast.v2` subprotocol): reading the server's JSON
//! frames, and each client's place in its room's history, which the offsets are checked
//! against and a resume (`--resume`) starts from.
//!
//! Every delivery is JSON in this mode, so the parse is on the hot path: one serde pass per
//! frame into borrowed strings (a string is copied only when it carries escapes).

use std::borrow::Cow;
use std::io::Write as _;

/// The subprotocol a client offers to get envelopes.
pub const PROTOCOL: &str = "roomcast.v2";

/// The fields loadgen reads from an envelope-mode frame; the others (`id`, an error's text)
/// are skipped. `Cow` fields borrow from the frame, but serde only borrows a `Cow` that is a
/// field's type itself (an `Option<Cow>` is always copied): hence the empty defaults, and
/// [`Text`] where absence matters.
#[derive(Debug, Default, serde::Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    room: Cow<'a, str>,
    #[serde(borrow, default)]
    message: Option<Text<'a>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Cow<'a, str>,
    #[serde(default)]
    recovered: Option<bool>,
    /// An error's code (rare, so `Option` and its copy are fine).
    #[serde(default)]
    code: Option<String>,
}

/// A string field that may be absent and still borrows from the frame.
#[derive(Debug, serde::Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// A message's place in its room's history (present when the server keeps history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp<'a> {
    pub offset: u64,
    pub epoch: Cow<'a, str>,
}

/// An envelope-mode frame as the checker sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// `message`: a delivery of `message` to `room`.
    Delivery {
        room: Cow<'a, str>,
        message: Cow<'a, str>,
        stamp: Option<Stamp<'a>>,
    },
    /// `subscribed`: the answer to a join, with the room's latest offset; after a resume,
    /// whether everything missed was replayed.
    Subscribed {
        room: Cow<'a, str>,
        stamp: Option<Stamp<'a>>,
        recovered: Option<bool>,
    },
    /// `ack` or `unsubscribed`: expected answers with nothing to check.
    Reply,
    /// `gap`: messages of `room` may have been lost at this client (the server skipped
    /// offsets, or the room's offsets started again in a new epoch); the next delivery
    /// starts a new run of offsets.
    Gap { room: Cow<'a, str> },
    /// An error reply, with its code.
    Error(String),
    /// Valid JSON of another type, or a `message` without its message.
    Other,
    /// Not a JSON object at all.
    Invalid,
}

/// Reads one envelope-mode text frame.
pub fn parse(frame: &[u8]) -> Frame<'_> {
    let Ok(w) = serde_json::from_slice::<Wire<'_>>(frame) else {
        return Frame::Invalid;
    };
    let stamp = w.offset.map(|offset| Stamp {
        offset,
        epoch: w.epoch,
    });
    match &*w.kind {
        "message" => match w.message {
            Some(Text(message)) => Frame::Delivery {
                room: w.room,
                message,
                stamp,
            },
            None => Frame::Other,
        },
        "subscribed" => Frame::Subscribed {
            room: w.room,
            stamp,
            recovered: w.recovered,
        },
        "ack" | "unsubscribed" => Frame::Reply,
        "gap" => Frame::Gap { room: w.room },
        "error" => Frame::Error(w.code.unwrap_or_else(|| "(no code)".into())),
        _ => Frame::Other,
    }
}

/// The number of room `name` (`<prefix><n>`), if it is one of loadgen's.
pub fn room_number(name: &str, prefix: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || digits.len() > 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends `,"since":{"offset":N,"epoch":E}` (the epoch escaped: it is the server's string).
pub fn write_since(out: &mut Vec<u8>, (offset, epoch): (u64, &str)) {
    // Writes to a Vec cannot fail, and a &str always serialises.
    let _ = write!(out, ",\"since\":{{\"offset\":{offset},\"epoch\":");
    let _ = serde_json::to_writer(&mut *out, epoch);
    out.push(b'}');
}

/// How the offsets of one client's room ran, over all its connections.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OffsetCounts {
    /// Deliveries in the client's room that carried an offset (none without history).
    pub stamped: u64,
    /// Deliveries whose offset skipped past the one after the last; also a resume answered
    /// with a latest offset beyond what the replay brought.
    pub gaps: u64,
    /// Deliveries whose offset was not above the last (the answer's, for a resume).
    pub repeats: u64,
    /// Resumes answered `recovered: true` and `recovered: false`.
    pub recovered: u64,
    pub recovered_false: u64,
    /// Deliveries that came on a resumed connection before its answer: the replay.
    pub replayed: u64,
    /// `gap` notices for the client's room: the server announced that messages may have
    /// been lost here.
    pub gap_notices: u64,
}

impl OffsetCounts {
    pub fn add(&mut self, o: &OffsetCounts) {
        self.stamped += o.stamped;
        self.gaps += o.gaps;
        self.repeats += o.repeats;
        self.recovered += o.recovered;
        self.recovered_false += o.recovered_false;
        self.replayed += o.replayed;
        self.gap_notices += o.gap_notices;
    }

    /// Whether the server told this client it may have lost messages of its room: a `gap`
    /// notice, or a resume answered `recovered: false`.
    pub fn announced_loss(&self) -> bool {
        self.gap_notices + self.recovered_false > 0
    }
}

/// A client's place in its room's history: the last offset it received and that offset's
/// epoch (where a resume starts), and the check that offsets run on by exactly one.
#[derive(Debug, Default)]
pub struct RoomPosition {
    /// The last offset received, or the latest one a `subscribed` answer named.
    last: Option<u64>,
    epoch: Option<Box<str>>,
    /// Whether the next offset must be `last + 1`. A plain rejoin unlinks (what was sent
    /// while away is not a gap: the client never asked for it) until its answer says where
    /// the room is; a resume stays linked, as its replay starts right after `last`. A `gap`
    /// notice unlinks too: the hole it announces is the server's admission, not a fault
    /// found.
    linked: bool,
    /// A resume was sent and not answered yet: deliveries until the answer are its replay.
    replaying: bool,
    pub counts: OffsetCounts,
}

impl RoomPosition {
    /// A delivery of `offset` in `epoch`.
    pub fn delivery(&mut self, offset: u64, epoch: &str) {
        self.counts.stamped += 1;
        self.counts.replayed += u64::from(self.replaying);
        if self.adopt_epoch(epoch) {
            // The first offset seen, or the room's offsets started again.
            self.restart(offset);
            return;
        }
        match self.last.filter(|_| self.linked) {
            Some(last) => {
                if offset > last + 1 {
                    self.counts.gaps += 1;
                } else if offset <= last {
                    self.counts.repeats += 1;
                }
                self.last = Some(last.max(offset));
            }
            None => self.last = Some(offset),
        }
        self.linked = true;
    }

    /// The `subscribed` answer: the room's latest offset and epoch (`None` from a server
    /// without history), and for a resume whether everything missed was replayed.
    pub fn subscribed(&mut self, latest: Option<(u64, &str)>, recovered: Option<bool>) {
        self.replaying = false;
        match recovered {
            Some(true) => self.counts.recovered += 1,
            Some(false) => self.counts.recovered_false += 1,
            None => {}
        }
        let Some((latest, epoch)) = latest else {
            return;
        };
        let same_epoch = !self.adopt_epoch(epoch);
        if let (Some(true), true, true, Some(last)) =
            (recovered, same_epoch, self.linked, self.last)
        {
            // The replay came before the answer and must have reached the latest.
            if latest > last {
                self.counts.gaps += 1;
            } else if latest < last {
                self.counts.repeats += 1;
            }
        }
        // Live messages come after the latest, whatever was (or was not) replayed.
        self.restart(latest);
    }

    /// A `gap` notice for the room: counted, and the next delivery (or answer) starts a new
    /// run of offsets instead of being checked against the last. `last` and the epoch stay,
    /// so a resume still asks from what was really received.
    pub fn gap_notice(&mut self) {
        self.counts.gap_notices += 1;
        self.linked = false;
    }

    /// A new connection: a resume (`resume`) carries on from the last offset, a plain rejoin
    /// starts over at its answer.
    pub fn reconnected(&mut self, resume: bool) {
        self.replaying = resume;
        if !resume {
            self.linked = false;
        }
    }

    /// Where a resume starts: the last offset and its epoch. Offset 0 of no epoch when the
    /// server never named one (it keeps no history), which it answers `recovered: false`.
    pub fn since(&self) -> (u64, &str) {
        (self.last.unwrap_or(0), self.epoch.as_deref().unwrap_or(""))
    }

    fn restart(&mut self, offset: u64) {
        self.last = Some(offset);
        self.linked = true;
    }

    /// Takes `epoch` as the room's; true when it differs from the one held (copied only
    /// then, so a delivery costs one short comparison).
    fn adopt_epoch(&mut self, epoch: &str) -> bool {
        if self.epoch.as_deref() == Some(epoch) {
            return false;
        }
        self.epoch = Some(epoch.into());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_borrow_and_unescape() {
        let f = br#"{"type":"message","room":"lg-3","message":"lg-3|17|42|123|xx","offset":9,"epoch":"ab12"}"#;
        let Frame::Delivery {
            room,
            message,
            stamp,
        } = parse(f)
        else {
            panic!("not a delivery")
        };
        assert!(matches!(
            (&room, &message),
            (Cow::Borrowed(_), Cow::Borrowed(_))
        ));
        assert_eq!((&*room, &*message), ("lg-3", "lg-3|17|42|123|xx"));
        let stamp = stamp.unwrap();
        assert_eq!((stamp.offset, &*stamp.epoch), (9, "ab12"));
        assert!(matches!(stamp.epoch, Cow::Borrowed(_)));

        // Escapes in the message (and epoch) are undone; the padding is the message's own.
        let f = br#"{"type":"message","room":"lg-\u0033","message":"lg-3|1|2|3|a\"b\\c\n\u00e9\ud83d\ude00","epoch":"e\"","offset":1}"#;
        let Frame::Delivery {
            room,
            message,
            stamp,
        } = parse(f)
        else {
            panic!("not a delivery")
        };
        assert_eq!(room, "lg-3");
        assert_eq!(message, "lg-3|1|2|3|a\"b\\c\n\u{e9}\u{1F600}");
        assert_eq!(stamp.map(|s| s.epoch), Some(Cow::Borrowed("e\"")));
        let Some(crate::client::Msg::Data { sender, seq, .. }) =
            crate::client::parse_msg(message.as_bytes())
        else {
            panic!("message not parsed")
        };
        assert_eq!((sender, seq), (1, 2));

        // Without history: no offset, so no stamp.
        let f = br#"{"type":"message","room":"r","message":""}"#;
        assert!(matches!(parse(f), Frame::Delivery { stamp: None, .. }));
    }

    #[test]
    fn answers_errors_and_strays() {
        let f = br#"{"type":"subscribed","room":"lg-1","offset":0,"epoch":"e"}"#;
        assert_eq!(
            parse(f),
            Frame::Subscribed {
                room: "lg-1".into(),
                stamp: Some(Stamp {
                    offset: 0,
                    epoch: "e".into()
                }),
                recovered: None
            }
        );
        let f = br#"{"type":"subscribed","room":"lg-1","offset":7,"epoch":"e","recovered":false}"#;
        assert!(matches!(
            parse(f),
            Frame::Subscribed {
                recovered: Some(false),
                ..
            }
        ));
        let f = br#"{"type":"subscribed","room":"lg-1","recovered":false}"#;
        assert!(matches!(
            parse(f),
            Frame::Subscribed {
                stamp: None,
                recovered: Some(false),
                ..
            }
        ));
        assert_eq!(
            parse(br#"{"type":"ack","id":"x","offset":3}"#),
            Frame::Reply
        );
        assert_eq!(
            parse(br#"{"type":"unsubscribed","room":"lg-1"}"#),
            Frame::Reply
        );
        let e = br#"{"type":"error","code":"limit","message":"rate","id":"q"}"#;
        assert_eq!(parse(e), Frame::Error("limit".into()));
        assert_eq!(
            parse(br#"{"type":"error"}"#),
            Frame::Error("(no code)".into())
        );
        assert_eq!(parse(br#"{"type":"message","room":"r"}"#), Frame::Other);
        assert_eq!(parse(br#"{"type":"joined"}"#), Frame::Other);
        assert_eq!(parse(b"lg-1|2|3|4|"), Frame::Invalid);
        assert_eq!(parse(br#"{"type":"message","offset":"7"}"#), Frame::Invalid);
    }

    #[test]
    fn gap_notices_are_parsed_counted_and_start_a_new_run() {
        let f = br#"{"type":"gap","room":"lg-4"}"#;
        assert_eq!(
            parse(f),
            Frame::Gap {
                room: "lg-4".into()
            }
        );
        assert!(matches!(
            parse(f),
            Frame::Gap {
                room: Cow::Borrowed(_)
            }
        ));
        let mut p = RoomPosition::default();
        p.subscribed(Some((10, "e")), None);
        p.delivery(11, "e");
        assert!(!p.counts.announced_loss());
        // The server announces that 12..=14 may be lost here: 15 starts a new run.
        p.gap_notice();
        p.delivery(15, "e");
        p.delivery(16, "e");
        assert_eq!(
            (p.counts.gaps, p.counts.repeats, p.counts.gap_notices),
            (0, 0, 1)
        );
        assert!(p.counts.announced_loss());
        assert_eq!(p.since(), (16, "e"));
        // Only the delivery right after the notice is spared: a later hole is a gap.
        p.delivery(18, "e");
        assert_eq!(p.counts.gaps, 1);
        // The same hole without a notice is a gap.
        let mut q = RoomPosition::default();
        q.subscribed(Some((10, "e")), None);
        q.delivery(11, "e");
        q.delivery(15, "e");
        assert_eq!((q.counts.gaps, q.counts.gap_notices), (1, 0));
        // A notice during a resume's replay: its answer is not held against the replay.
        p.reconnected(true);
        p.delivery(19, "e");
        p.gap_notice();
        p.subscribed(Some((25, "e")), Some(true));
        p.delivery(26, "e");
        assert_eq!((p.counts.gaps, p.counts.gap_notices), (1, 2));
        assert_eq!(p.since(), (26, "e"));
        // recovered:false announces a loss as well.
        let mut r = RoomPosition::default();
        r.subscribed(Some((3, "e")), Some(false));
        assert!(r.counts.announced_loss());
    }

    #[test]
    fn room_numbers_and_since() {
        assert_eq!(room_number("lg-12", "lg-"), Some(12));
        assert_eq!(room_number("lg-", "lg-"), None);
        assert_eq!(room_number("lg-1x", "lg-"), None);
        assert_eq!(room_number("xx-1", "lg-"), None);
        assert_eq!(room_number("lg-99999999999", "lg-"), None);
        let mut out = b"{\"room\":\"r\"".to_vec();
        write_since(&mut out, (41, "e\"1"));
        out.push(b'}');
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["since"]["offset"], 41);
        assert_eq!(v["since"]["epoch"], "e\"1");
    }

    #[test]
    fn offsets_run_on_by_one() {
        let mut p = RoomPosition::default();
        assert_eq!(p.since(), (0, ""), "nothing known yet");
        p.subscribed(Some((10, "e")), None);
        for o in [11, 12, 14, 14, 13, 15] {
            p.delivery(o, "e");
        }
        // 12 -> 14 skips 13; the second 14 and the late 13 are not above the last.
        assert_eq!((p.counts.gaps, p.counts.repeats), (1, 2));
        assert_eq!(p.since(), (15, "e"));
        // A new epoch: the offsets started again, which is no fault.
        p.delivery(1, "f");
        p.delivery(2, "f");
        assert_eq!((p.counts.gaps, p.counts.repeats), (1, 2));
        assert_eq!(p.since(), (2, "f"));
        // Without an answer, the first offset of a client is taken as it comes.
        let mut q = RoomPosition::default();
        q.delivery(500, "e");
        q.delivery(501, "e");
        assert_eq!(
            (q.counts.stamped, q.counts.gaps, q.counts.repeats),
            (2, 0, 0)
        );
    }

    #[test]
    fn resume_bookkeeping() {
        let mut p = RoomPosition::default();
        // First connection: joined at 5, received nothing before the reconnect, so the
        // resume starts from the answer's offset.
        p.subscribed(Some((5, "e")), None);
        p.reconnected(true);
        assert_eq!(p.since(), (5, "e"));
        // The replay must start right after it, and the answer match its end.
        p.delivery(6, "e");
        p.delivery(7, "e");
        p.subscribed(Some((7, "e")), Some(true));
        p.delivery(8, "e");
        assert_eq!(
            p.counts,
            OffsetCounts {
                stamped: 3,
                recovered: 1,
                replayed: 2,
                ..OffsetCounts::default()
            }
        );
        // A replay that skipped 9, then stopped short of the latest (11 and 12 missing).
        p.reconnected(true);
        p.delivery(10, "e");
        p.subscribed(Some((12, "e")), Some(true));
        assert_eq!((p.counts.gaps, p.counts.repeats), (2, 0));
        assert_eq!(p.since(), (12, "e"), "live goes on after the latest");
        // Not recovered (history gone, or another epoch): counted, and the answer's place
        // is where the client carries on.
        p.reconnected(true);
        p.subscribed(Some((90, "g")), Some(false));
        p.delivery(91, "g");
        assert_eq!(p.counts.recovered_false, 1);
        assert_eq!((p.counts.gaps, p.counts.repeats), (2, 0));
        // A plain rejoin is not a resume: jumping to the answer's offset is no gap.
        p.reconnected(false);
        p.subscribed(Some((200, "g")), None);
        p.delivery(201, "g");
        assert_eq!((p.counts.gaps, p.counts.repeats), (2, 0));
        // Without history there is no position: resumes ask from nothing and are refused.
        let mut n = RoomPosition::default();
        n.subscribed(None, None);
        n.reconnected(true);
        assert_eq!(n.since(), (0, ""));
        n.subscribed(None, Some(false));
        assert_eq!(n.counts.recovered_false, 1);
    }
}

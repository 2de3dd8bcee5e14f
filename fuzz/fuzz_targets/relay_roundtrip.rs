//! `encode_relay` → `decode_relay` must give back exactly the message, origin and sending
//! connection that went in, for any strings; and the payload must stay readable by original
//! nodes, i.e. `decode` sees it as dialect 2 `sendMessage` to the same room.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use roomcast::protocol::{self, ClientError, Command, Relay};

#[derive(Debug, Arbitrary)]
struct Input {
    room: String,
    message: String,
    origin: String,
    conn: Option<u64>,
}

fuzz_target!(|input: Input| {
    let wire = protocol::encode_relay(&input.room, &input.message, &input.origin, input.conn);
    assert!(std::str::from_utf8(&wire).is_ok());

    let mut buf = wire.clone();
    assert_eq!(
        protocol::decode_relay(&mut buf),
        Some(Relay {
            message: &input.message,
            origin: Some(&input.origin),
            conn: input.conn,
            offset: None,
            epoch: None,
        }),
        "relay payload: {}",
        String::from_utf8_lossy(&wire)
    );

    let mut buf = wire.clone();
    let expected = if input.room.is_empty() {
        Err(ClientError::BadField("roomId"))
    } else if input.room.starts_with(protocol::RESERVED_PREFIX) {
        Err(ClientError::ReservedRoom("roomId"))
    } else {
        Ok(Command::SendMessage {
            room: &input.room,
            message: &input.message,
            id: protocol::Id::Absent,
        })
    };
    assert_eq!(protocol::decode(&mut buf), expected);
});

//! Support for `protocol_fuzz`: a hand-written ttrpc wire, a seeded generator, random and
//! hostile agent requests, and a harness around the real agent binary.

pub mod harness;
pub mod hostile;
pub mod messages;
pub mod rng;
pub mod wire;

use std::time::Duration;

use protobuf::reflect::MessageDescriptor;
use protocol::agent::{self as pb};

pub const SERVICE: &str = "hyperstart.v1.Agent";

/// Never sent. In host mode Reboot and Shutdown exit the process by design, and so would
/// DebugPanic with `--debug`. Their requests are empty messages, and protobuf accepts many byte
/// strings as an empty message (the empty string, any run of well-formed unknown fields), so a
/// "random" payload would quite often be a real reboot. A payload that does not decode never
/// reaches any handler (ttrpc rejects it first), which case 3 shows for every other method.
pub const EXITING_METHODS: [&str; 3] = ["Reboot", "Shutdown", "DebugPanic"];

/// Methods whose answer may legitimately wait (long polls, waits, pings). Case 3 sends them on
/// connections of their own and collects the answers at the end; see [`long_poll_bound`].
pub const LONG_POLL_METHODS: [&str; 4] = ["GetEvents", "ReadStream", "WaitProcess", "PingHost"];

/// How long any other answer may take before the agent counts as wedged.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// `timeout_nano` of ordinary requests.
pub const REQUEST_TIMEOUT_NANO: i64 = 2_000_000_000;

/// Written by every hostile CopyFile; must not appear in any file afterwards.
pub const ESCAPE_MARKER: &[u8] = b"hyperstart-fuzz: this file escaped the file store\n";

/// One RPC of the service: its name and request type.
pub struct Method {
    pub name: String,
    pub input: MessageDescriptor,
}

/// Every method of `hyperstart.v1.Agent`, from the descriptor compiled from agent.proto.
pub fn all_methods() -> Vec<Method> {
    let file = pb::file_descriptor();
    let service = file
        .services()
        .find(|s| s.proto().name() == "Agent")
        .expect("agent.proto defines service Agent");
    let methods: Vec<Method> = service
        .methods()
        .map(|m| Method {
            name: m.proto().name().to_owned(),
            input: m.input_type(),
        })
        .collect();
    for name in EXITING_METHODS.iter().chain(LONG_POLL_METHODS.iter()) {
        assert!(
            methods.iter().any(|m| m.name == *name),
            "{name} is not in agent.proto any more: update this test"
        );
    }
    methods
}

/// The methods case 3 sends: all but [`EXITING_METHODS`].
pub fn fuzzable_methods() -> Vec<Method> {
    all_methods()
        .into_iter()
        .filter(|m| !EXITING_METHODS.contains(&m.name.as_str()))
        .collect()
}

/// How long a long-poll request may go unanswered: its clamp plus [`ANSWER_TIMEOUT`], or `None`
/// when the protocol sets no bound (PingHost: up to MAX_PING_COUNT x MAX_PING_TIMEOUT_MS;
/// WaitProcess without a short deadline of its own).
pub fn long_poll_bound(method: &str, timeout_nano: i64) -> Option<Duration> {
    let ms = |ms: u32| Some(Duration::from_millis(u64::from(ms)) + ANSWER_TIMEOUT);
    match method {
        "GetEvents" => ms(protocol::MAX_EVENTS_WAIT_MS),
        "ReadStream" => ms(protocol::MAX_READ_STREAM_WAIT_MS),
        "WaitProcess" if (1..=10_000_000_000).contains(&timeout_nano) => {
            Some(Duration::from_nanos(timeout_nano as u64) + ANSWER_TIMEOUT)
        }
        _ => None,
    }
}

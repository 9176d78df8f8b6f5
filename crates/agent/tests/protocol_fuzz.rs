//! Hostile bytes on the agent's socket never crash or wedge the real `hyperstart` binary.
//!
//! The test speaks ttrpc itself (10-byte header: u32 BE length, u32 BE stream id, u8 type, u8
//! flags; a request's payload is a protobuf `ttrpc.Request`), so it can send what no well-behaved
//! client would:
//!
//! 1. garbage on the raw socket, including headers declaring 4 GiB bodies;
//! 2. well-formed frames naming services and methods that do not exist;
//! 3. every method of `hyperstart.v1.Agent` (listed from the compiled descriptor of agent.proto)
//!    with random bytes, random valid messages (built by protobuf reflection) and mutated valid
//!    encodings;
//! 4. valid messages with hostile values (path-like ids, huge sizes and waits, bad signals,
//!    garbage JSON, CopyFile paths that try to leave the file store), which must be refused with
//!    a client-error code.
//!
//! After every frame the agent process must still run; every few frames and after every case
//! it must answer `Ping` on a fresh connection. A decodable request must be answered within 5 s,
//! long polls (GetEvents, ReadStream, WaitProcess with a deadline) within their clamp plus 5 s.
//! The support code (wire format, generator, harness, hostile requests) is in `fuzz/`.
//!
//! Randomness is a seeded xorshift generator: `HYPERNETES_FUZZ_SEED` (decimal or 0x-hex)
//! replaces the fixed default seed and `HYPERNETES_FUZZ_ITERS` the number of frames of cases 1-3
//! (default 2000). Failures print the seed, the frame index and the last frames sent.
//!
//! Needs root: the agent runs in its own network, UTS, IPC and mount namespaces with a tmpfs on
//! `/run`, so that random but valid UpdateInterface / UpdateRoutes / CreateSandbox / CopyFile
//! requests change nothing on the host.

mod common;
mod fuzz;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use protocol::agent::{self as pb};
use protocol::client::connect_unix;
use protocol::AgentClient;
use ttrpc::Code;

use fuzz::harness::Harness;
use fuzz::hostile::{
    check_hostile, clamped_requests, copy_file_requests, id_requests, make_rootfs,
    sandbox_requests, spec_json, value_requests, Hostile, BUSYBOX, VICTIM,
};
use fuzz::messages::{mutate, random_message, random_string, I64S};
use fuzz::rng::{base_seed, total_iters, Rng};
use fuzz::wire::{
    code_name, header, hex_prefix, read_reply, request_body, request_frame, Reply, HEADER_LEN,
    MAX_FRAME, TYPE_REQUEST,
};
use fuzz::{
    all_methods, fuzzable_methods, long_poll_bound, ANSWER_TIMEOUT, LONG_POLL_METHODS,
    REQUEST_TIMEOUT_NANO, SERVICE,
};

// Case 1: garbage on the raw socket

#[test]
fn case1_garbage_bytes_on_the_socket() {
    let seed = base_seed() ^ 1;
    let mut rng = Rng::new(seed);
    let mut h = Harness::start("garbage", seed);
    let rss_before = h.rss_kib();

    // Headers declaring bodies beyond ttrpc's 4 MiB limit: rejected, not allocated.
    for len in [u32::MAX, 0x8000_0000, (MAX_FRAME + 1) as u32] {
        h.note(format!("header declaring {len} bytes, no body, then close"));
        let mut conn = h.connect();
        conn.write_all(&header(len, 1, TYPE_REQUEST, 0)).unwrap();
        match read_reply(&mut conn, Duration::from_millis(100)) {
            Ok(Reply::Silent | Reply::Closed) => {}
            other => h.fail(&format!("answer to a bodiless frame: {other:?}")),
        }
        drop(conn);
        h.after_frame();
    }
    // A body one byte over the limit, actually sent: discarded, answered INVALID_ARGUMENT.
    {
        h.note(format!("request of {} bytes", MAX_FRAME + 1));
        let mut conn = h.connect();
        let mut frame = header((MAX_FRAME + 1) as u32, 7, TYPE_REQUEST, 0).to_vec();
        frame.resize(HEADER_LEN + MAX_FRAME + 1, 0x0a);
        conn.write_all(&frame).unwrap();
        match read_reply(&mut conn, ANSWER_TIMEOUT) {
            Ok(Reply::Answer {
                stream_id: 7, code, ..
            }) if code == Code::INVALID_ARGUMENT as i32 => {}
            other => h.fail(&format!("oversized request: {other:?}")),
        }
        h.after_frame();
    }

    let n = total_iters() * 20 / 100;
    for i in 0..n {
        let mut conn = h.connect();
        match i % 4 {
            // Random bytes. Mostly with a small first byte: a random 32-bit length is nearly
            // always oversized, and ttrpc discards an oversized body page by page even after
            // EOF, which costs the agent ~0.5 s of CPU per 4 GiB declared (debug build).
            0 => {
                let len = rng.size();
                let mut junk = rng.bytes(len);
                if !rng.one_in(8) && !junk.is_empty() {
                    junk[0] = 0;
                }
                h.note(format!("raw {}", hex_prefix(&junk)));
                let _ = conn.write_all(&junk);
            }
            // One frame with a random body, type and flags: a request frame is answered
            // INVALID_ARGUMENT (undecodable, or no such method), anything else is ignored.
            1 => {
                let len = rng.size().min(4096);
                let body = rng.bytes(len);
                let ty = if rng.one_in(2) {
                    TYPE_REQUEST
                } else {
                    rng.next_u64() as u8
                };
                let stream_id = rng.next_u64() as u32;
                let flags = rng.next_u64() as u8;
                h.note(format!(
                    "frame type {ty} flags {flags:#x} stream {stream_id} body {}",
                    hex_prefix(&body)
                ));
                let mut frame = header(len as u32, stream_id, ty, flags).to_vec();
                frame.extend_from_slice(&body);
                let _ = conn.write_all(&frame);
                if ty == TYPE_REQUEST {
                    match read_reply(&mut conn, ANSWER_TIMEOUT) {
                        Ok(Reply::Answer {
                            stream_id: s, code, ..
                        }) if s == stream_id && code == Code::INVALID_ARGUMENT as i32 => {}
                        other => h.fail(&format!("random request body: {other:?}")),
                    }
                }
            }
            // A frame cut short, then the connection closes.
            2 => {
                let len = rng.size().min(4096) + 1;
                let sent = rng.below(len);
                let body = rng.bytes(sent);
                h.note(format!("frame declaring {len} bytes, {} sent", body.len()));
                let mut frame = header(len as u32, 1, TYPE_REQUEST, 0).to_vec();
                frame.extend_from_slice(&body);
                let _ = conn.write_all(&frame);
            }
            // Several small random frames back to back.
            _ => {
                let mut burst = Vec::new();
                for _ in 0..rng.below(8) + 2 {
                    let len = rng.below(64);
                    let body = rng.bytes(len);
                    let ty = rng.below(4) as u8;
                    burst.extend_from_slice(&header(len as u32, rng.next_u64() as u32, ty, 0));
                    burst.extend_from_slice(&body);
                }
                h.note(format!("burst {}", hex_prefix(&burst)));
                let _ = conn.write_all(&burst);
                let _ = read_reply(&mut conn, Duration::from_millis(20));
            }
        }
        drop(conn);
        h.after_frame();
    }
    h.assert_alive();
    let grown = h.rss_kib().saturating_sub(rss_before);
    if grown > 128 << 10 {
        h.fail(&format!("the agent's RSS grew by {grown} KiB"));
    }
}

// Case 2: methods that do not exist

#[test]
fn case2_unknown_services_and_methods() {
    let seed = base_seed() ^ 2;
    let mut rng = Rng::new(seed);
    let mut h = Harness::start("names", seed);
    let real: Vec<String> = all_methods()
        .iter()
        .map(|m| format!("/{SERVICE}/{}", m.name))
        .collect();
    let method_names: Vec<String> = all_methods().into_iter().map(|m| m.name).collect();
    let near_services: &[&[u8]] = &[
        b"hyperstart.v1.agent",
        b"hyperstart.v2.Agent",
        b"hyperstart.v1.Agent ",
        b"hyperstart.v1",
        b"",
        b"/",
        b"hyperstart.v1.Agent/Ping",
        b"grpc.health.v1.Health",
        b"\xff\xfe",
    ];

    let mut conn = h.connect();
    let n = total_iters() * 15 / 100;
    for i in 0..n {
        let service: Vec<u8> = match rng.below(3) {
            0 => SERVICE.as_bytes().to_vec(),
            1 => rng.pick(near_services).to_vec(),
            _ => {
                let len = rng.size().min(300);
                rng.bytes(len)
            }
        };
        let method: Vec<u8> = match rng.below(4) {
            0 => rng.pick(&method_names).to_lowercase().into_bytes(),
            1 => format!("{}/../{}", rng.pick(&method_names), rng.pick(&method_names)).into_bytes(),
            2 => random_string(&mut rng).into_bytes(),
            _ => {
                let len = rng.size().min(300);
                rng.bytes(len)
            }
        };
        let path = format!(
            "/{}/{}",
            String::from_utf8_lossy(&service),
            String::from_utf8_lossy(&method)
        );
        if real.contains(&path) {
            continue;
        }
        let payload_len = rng.size();
        let payload = rng.bytes(payload_len);
        let timeout_nano = *rng.pick(I64S);
        let metadata: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.below(4) * rng.below(30))
            .map(|_| {
                (
                    random_string(&mut rng).into_bytes(),
                    random_string(&mut rng).into_bytes(),
                )
            })
            .collect();
        let stream_id = 2 * i as u32 + 1;
        h.note(format!(
            "service {} method {} timeout_nano {timeout_nano} metadata {} payload {}",
            hex_prefix(&service),
            hex_prefix(&method),
            metadata.len(),
            hex_prefix(&payload)
        ));
        let body = request_body(&service, &method, &payload, timeout_nano, &metadata);
        if conn.write_all(&request_frame(stream_id, &body)).is_err() {
            h.fail("the agent closed the connection");
        }
        match read_reply(&mut conn, ANSWER_TIMEOUT) {
            Ok(Reply::Answer {
                stream_id: s, code, ..
            }) if s == stream_id && code == Code::INVALID_ARGUMENT as i32 => {}
            other => h.fail(&format!("request for {path:?}: {other:?}")),
        }
        h.after_frame();
    }
    h.assert_alive();
}

// Case 3: every method, random payloads

/// Long-poll requests in flight while case 3 goes on.
const MAX_PENDING: usize = 32;

/// A long-poll request awaiting its answer on a connection of its own.
struct Pending {
    conn: UnixStream,
    stream_id: u32,
    method: String,
    sent: Instant,
    /// Answer by then (see `long_poll_bound`).
    bound: Duration,
    /// The frame as noted in the harness.
    frame: String,
}

/// Whether something (an answer, or EOF) has arrived on `conn`.
fn readable(conn: &UnixStream) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// Checks the pending long polls: those answered are checked and dropped (an answer after the
/// bound fails); with `wait`, the rest are waited for up to their bounds.
fn reap(h: &Harness, pending: &mut Vec<Pending>, wait: bool) {
    pending.retain_mut(|p| {
        if !wait && !readable(&p.conn) {
            return true;
        }
        let bound = p.bound;
        // An answer already waiting arrived in time as far as this check can tell: the loop may
        // come back to it only after the bound (a busy machine, a slow frame before). Only an
        // answer still missing once the bound has passed is late.
        let arrived = readable(&p.conn);
        let late = !arrived && Instant::now() > p.sent + bound;
        let left = if arrived {
            Duration::from_secs(5)
        } else {
            (p.sent + bound).saturating_duration_since(Instant::now())
        };
        match h.reply(&mut p.conn, &p.method, left) {
            Reply::Answer { stream_id, .. } if stream_id == p.stream_id && !late => false,
            other => h.fail(&format!(
                "{} did not answer within {bound:?} (late: {late}): {other:?}; the request: {}",
                p.method, p.frame
            )),
        }
    });
}

#[test]
fn case3_every_method_with_random_payloads() {
    let seed = base_seed() ^ 3;
    let mut rng = Rng::new(seed);
    let mut h = Harness::start("methods", seed);
    let methods = fuzzable_methods();
    let mut codes: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut conn: Option<UnixStream> = None;
    let mut pending: Vec<Pending> = Vec::new();
    let mut stream_id = 1u32;

    // A payload that does not decode never reaches the handler. ttrpc 0.10 sends no answer at
    // all and drops the connection once the next frame arrives; an error answer would do too.
    {
        h.note("Ping with payload ff".to_owned());
        let mut c = h.connect();
        match h.call_raw(&mut c, 1, "Ping", &[0xff], Duration::from_millis(300)) {
            Reply::Silent | Reply::Closed => {}
            Reply::Answer { code, .. } if code != Code::OK as i32 => {}
            other => h.fail(&format!("undecodable Ping payload answered {other:?}")),
        }
        h.after_frame();
    }

    let n = total_iters() - total_iters() * 20 / 100 - total_iters() * 15 / 100;
    for i in 0..n {
        reap(&h, &mut pending, false);
        // Round robin over the methods, so each gets its share whatever the seed.
        let method = &methods[i % methods.len()];
        let (kind, payload) = match rng.below(20) {
            0..=4 => {
                let len = rng.size();
                ("random bytes", rng.bytes(len))
            }
            5..=12 => (
                "random message",
                random_message(&mut rng, &method.input, 0)
                    .write_to_bytes_dyn()
                    .unwrap(),
            ),
            _ => {
                let valid = random_message(&mut rng, &method.input, 0)
                    .write_to_bytes_dyn()
                    .unwrap();
                ("mutated message", mutate(&mut rng, valid))
            }
        };
        if payload.len() > MAX_FRAME - 1024 {
            continue;
        }
        let timeout_nano = if rng.one_in(8) {
            *rng.pick(I64S)
        } else {
            REQUEST_TIMEOUT_NANO
        };
        let decodes = method.input.parse_from_bytes(&payload).is_ok();
        h.note(format!(
            "{} ({kind}, {}) timeout_nano {timeout_nano} payload {}",
            method.name,
            if decodes {
                "decodes"
            } else {
                "does not decode"
            },
            hex_prefix(&payload)
        ));

        stream_id = stream_id.wrapping_add(2);
        if !decodes {
            // No answer will come (see above): send it and hang up.
            let mut c = conn.take().unwrap_or_else(|| h.connect());
            Harness::send(&mut c, stream_id, &method.name, &payload, timeout_nano);
            drop(c);
            h.after_frame();
            continue;
        }
        if LONG_POLL_METHODS.contains(&method.name.as_str()) {
            // On a connection of its own, answered (or not) by the end of the case.
            let mut c = h.connect();
            Harness::send(&mut c, stream_id, &method.name, &payload, timeout_nano);
            // Without a bound (PingHost, WaitProcess without a short deadline), just hang up.
            if let Some(bound) = long_poll_bound(&method.name, timeout_nano) {
                if pending.len() == MAX_PENDING {
                    let oldest = pending.remove(0);
                    reap(&h, &mut vec![oldest], true);
                }
                pending.push(Pending {
                    conn: c,
                    stream_id,
                    method: method.name.clone(),
                    sent: Instant::now(),
                    bound,
                    frame: h.recent.back().cloned().unwrap_or_default(),
                });
            }
            h.after_frame();
            continue;
        }
        let mut c = conn.take().unwrap_or_else(|| h.connect());
        if !Harness::send(&mut c, stream_id, &method.name, &payload, timeout_nano) {
            h.assert_running();
            h.fail("the agent closed the connection");
        }
        match h.reply(&mut c, &method.name, ANSWER_TIMEOUT) {
            Reply::Answer {
                stream_id: s,
                code,
                message,
            } => {
                if s != stream_id {
                    h.fail(&format!("answer for stream {s}, expected {stream_id}"));
                }
                let entry = codes
                    .entry((method.name.clone(), code_name(code)))
                    .or_default();
                *entry += 1;
                if *entry == 1 && (code == Code::INTERNAL as i32 || code == Code::UNKNOWN as i32) {
                    eprintln!(
                        "protocol_fuzz: {} answered {} to valid input ({message}); frame #{}",
                        method.name,
                        code_name(code),
                        h.frames
                    );
                }
                conn = Some(c);
            }
            Reply::Silent => h.fail(&format!(
                "{} did not answer within {ANSWER_TIMEOUT:?}",
                method.name
            )),
            Reply::Closed => {
                h.assert_running();
                h.fail(&format!(
                    "the agent dropped the connection on a valid {} request",
                    method.name
                ));
            }
        }
        h.after_frame();
    }
    reap(&h, &mut pending, true);
    h.assert_alive();
    h.assert_nothing_escaped();

    // Random CreateSandbox requests may have succeeded: tear the pod down again.
    let client = AgentClient::new(connect_unix(&h.sock).unwrap()).with_timeout(ANSWER_TIMEOUT);
    let _ = client.destroy_sandbox();
    let mut summary = String::new();
    for ((method, code), count) in &codes {
        let _ = write!(summary, "{method}:{code}={count} ");
    }
    eprintln!("protocol_fuzz methods: answers to decodable payloads: {summary}");
}

// Case 4: valid messages, hostile values

#[test]
fn case4_hostile_values_are_refused() {
    let seed = base_seed() ^ 4;
    let mut h = Harness::start("hostile", seed);
    let client = AgentClient::new(connect_unix(&h.sock).unwrap()).with_timeout(ANSWER_TIMEOUT);
    let mut failures = Vec::new();
    let run = |h: &mut Harness, list: Vec<Hostile>, failures: &mut Vec<String>| {
        for req in list {
            h.note(format!("{} ({})", req.what, req.method));
            if let Err(e) = check_hostile(&h.sock, &req) {
                failures.push(e);
            }
            h.after_frame();
        }
    };

    // The pod first: DestroySandbox would take the victim container with it. Each request on
    // its own, so that one wrongly accepted does not turn the rest into ALREADY_EXISTS.
    for req in sandbox_requests() {
        run(&mut h, vec![req], &mut failures);
        let _ = client.destroy_sandbox();
    }

    let rootfs = h.base.join("rootfs");
    let rootfs_str = rootfs.to_str().unwrap().to_owned();
    let victim_pid = if Path::new(BUSYBOX).exists() {
        make_rootfs(&rootfs);
        let pid = client
            .create_container(
                VICTIM,
                spec_json(&["sleep", "60"]),
                pb::Rootfs::from_host_dir(&rootfs_str, false),
            )
            .unwrap_or_else(|e| h.fail(&format!("creating the victim container: {e:?}")));
        client
            .start_container(VICTIM)
            .unwrap_or_else(|e| h.fail(&format!("starting the victim container: {e:?}")));
        Some(pid)
    } else {
        eprintln!("protocol_fuzz hostile: no {BUSYBOX}; requests aimed at a live container only meet a missing one");
        None
    };

    // The long polls run alongside the rest.
    let sock = h.sock.clone();
    let polls: Vec<_> = clamped_requests()
        .into_iter()
        .map(|req| {
            let sock = sock.clone();
            thread::spawn(move || check_hostile(&sock, &req))
        })
        .collect();

    run(&mut h, id_requests(&rootfs_str), &mut failures);
    run(&mut h, value_requests(&rootfs_str), &mut failures);
    run(&mut h, copy_file_requests(), &mut failures);
    for poll in polls {
        if let Err(e) = poll.join().unwrap() {
            failures.push(e);
        }
    }
    h.assert_alive();
    h.assert_nothing_escaped();

    // No hostile id, exec id or signal reached the victim.
    if let Some(pid) = victim_pid {
        // Running, not a zombie waiting for the agent's reaper.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        let alive = matches!(state, Some(s) if s != "Z" && s != "X");
        if !alive {
            failures.push(format!("the victim container (pid {pid}) was killed"));
        }
        let _ = client.remove_container(VICTIM);
    }
    let _ = client.destroy_sandbox();
    if !failures.is_empty() {
        h.fail(&format!(
            "{} hostile requests were not refused properly:\n    {}",
            failures.len(),
            failures.join("\n    ")
        ));
    }
}

//! The threads that watch a pod: the VMM supervisor, the agent event poller, and the log
//! forwarders of each container.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::agent as pb;
use protocol::client::ReconnectingClient;

use crate::error::{is_deadline, is_not_found, Result};
use crate::events::{ContainerEvent, EventKind};
use crate::lifecycle::exit_from_wait;
use crate::logs::{forward, Forwarders, LogStream, LogWriter, ReadFailure, StreamChunk};
use crate::manager::Inner;
use crate::pod::{LogHandle, Pod};
use crate::process::{VmmExit, VmmProcess};
use crate::record::{ContainerRecord, ContainerState, ExitInfo, PodState, REASON_VMM_EXITED};
use crate::{error_chain, now_nanos};

/// How often the supervisor checks for shutdown while it waits for the VMM.
const SUPERVISOR_TICK: Duration = Duration::from_millis(250);
/// Long-poll wait of `GetEvents` and `ReadStream`. It bounds how long dropping the manager
/// takes (it joins these threads) against the RPCs an idle pod costs.
pub(crate) const POLL_WAIT: Duration = Duration::from_secs(2);
/// Pause after a failed `GetEvents`.
const EVENT_RETRY: Duration = Duration::from_millis(500);

impl Inner {
    /// Watches the VMM until it exits (then updates the pod) or the manager shuts down (then
    /// the VMM keeps running for the next manager).
    pub(crate) fn spawn_supervisor(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        vmm: Arc<VmmProcess>,
    ) -> Result<()> {
        let inner = self.clone();
        self.spawn(format!("vmm-{}", vmm.pid()), move || loop {
            if inner.is_shut_down() {
                return;
            }
            if vmm.wait_exit(SUPERVISOR_TICK) {
                let exit = vmm.reap();
                inner.on_vmm_exit(&pod, exit);
                return;
            }
        })
    }

    /// The VMM is gone. Unless a stop or a failed boot is handling it, the pod becomes
    /// NOTREADY and its containers EXITED ("VMM exited", exit code 255).
    pub(crate) fn on_vmm_exit(&self, pod: &Pod, exit: VmmExit) {
        let why = exit.describe();
        pod.note_vmm_exit(exit);
        let mut events = Vec::new();
        let mut logs = Vec::new();
        {
            let mut data = pod.data();
            if data.stopping || data.removed || data.record.state != PodState::Ready {
                log::info!("pod {}: {why}", pod.id);
                return;
            }
            log::warn!(
                "pod {}: {why} unexpectedly\n{}",
                pod.id,
                self.vm_log_tails(&pod.id)
            );
            let cids = data.containers_in(&[ContainerState::Created, ContainerState::Running]);
            for cid in cids {
                if let Some(c) = data.containers.get_mut(&cid) {
                    c.record
                        .set_exited(&ExitInfo::vm_gone(REASON_VMM_EXITED, &why));
                }
                data.persist_container(&self.layout, &cid);
                events.push(ContainerEvent::container(&pod.id, &cid, EventKind::Stopped));
            }
            logs.extend(data.containers.values().filter_map(|c| c.logs.clone()));
            data.record.state = PodState::NotReady;
            data.record.reason = REASON_VMM_EXITED.into();
            data.record.message = why;
            data.record.vmm = None;
            data.vmm = None;
            data.agent = None;
            data.persist(&self.layout);
            events.push(ContainerEvent::pod(&pod.id, EventKind::Stopped));
        }
        for l in logs {
            l.forwarders.stop();
        }
        self.remove_sockets(&pod.id);
        self.bus.publish_all(events);
    }

    /// The last lines of a pod's VMM log and guest console: why its VM went away, for the
    /// operator's log (both files go when the pod is removed).
    fn vm_log_tails(&self, pod_id: &str) -> String {
        const LINES: usize = 12;
        let tail = |path: &std::path::Path| {
            let text = std::fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LINES)..].join("\n")
        };
        format!(
            "--- VMM log (tail) ---\n{}\n--- guest console (tail) ---\n{}",
            tail(&self.layout.vmm_log(pod_id)),
            tail(&self.layout.console_log(pod_id))
        )
    }

    /// Long-polls the agent's event log and applies container exits. `recovered`: the
    /// manager restarted, so the log is read from the start (events are deduplicated by
    /// state) and running containers are checked first.
    pub(crate) fn spawn_event_loop(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        agent: ReconnectingClient,
        recovered: bool,
    ) -> Result<()> {
        let inner = self.clone();
        let name = format!("events-{}", pod.id);
        self.spawn(name, move || {
            let agent = agent.with_timeout(Duration::from_secs(10));
            let mut after = 0u64;
            let mut resync = recovered;
            loop {
                if inner.is_shut_down() || !pod.data().is_ready() {
                    return;
                }
                if resync {
                    inner.resync_exits(&pod, &agent);
                    resync = false;
                }
                match agent.get_events(after, 0, POLL_WAIT) {
                    Ok(r) => {
                        if r.dropped > 0 {
                            log::warn!("pod {}: {} agent events were lost", pod.id, r.dropped);
                            resync = true;
                        }
                        for ev in &r.events {
                            after = after.max(ev.seq);
                            inner.apply_agent_event(&pod, ev);
                        }
                    }
                    Err(e) => {
                        log::debug!("pod {}: GetEvents: {}", pod.id, error_chain(&e));
                        std::thread::sleep(EVENT_RETRY);
                    }
                }
            }
        })
    }

    fn apply_agent_event(&self, pod: &Pod, ev: &pb::Event) {
        if !ev.exec_id.is_empty() {
            return;
        }
        match ev.type_.enum_value() {
            Ok(pb::EventType::EVENT_EXITED) => {
                let exit = ExitInfo {
                    status: ev.exit_code,
                    signal: ev.signal,
                    oom_killed: ev.oom_killed,
                    // The host's clock (see exit_from_wait).
                    finished_at_nanos: now_nanos(),
                    reason: None,
                    message: String::new(),
                };
                self.container_exited(pod, &ev.container_id, exit);
            }
            Ok(pb::EventType::EVENT_STARTED) => {
                // Normally start_container has recorded this already; after a crash between
                // the agent's start and the record write, this catches up.
                let changed = {
                    let mut data = pod.data();
                    let changed = match data.containers.get_mut(&ev.container_id) {
                        Some(c) if c.record.state.can_become(ContainerState::Running) => {
                            c.record.state = ContainerState::Running;
                            c.record.started_at_nanos = now_nanos();
                            true
                        }
                        _ => false,
                    };
                    if changed {
                        data.persist_container(&self.layout, &ev.container_id);
                    }
                    changed
                };
                if changed {
                    self.bus.publish(ContainerEvent::container(
                        &pod.id,
                        &ev.container_id,
                        EventKind::Started,
                    ));
                }
            }
            _ => {}
        }
    }

    /// Asks the agent about every RUNNING container (events may have been lost).
    fn resync_exits(&self, pod: &Pod, agent: &ReconnectingClient) {
        let running = pod.data().containers_in(&[ContainerState::Running]);
        let quick = agent.with_timeout(Duration::from_millis(300));
        for cid in running {
            match quick.wait_process(&cid, "") {
                Ok(r) => self.container_exited(pod, &cid, exit_from_wait(&r)),
                Err(e) if is_deadline(&e) => {}
                Err(e) if is_not_found(&e) => self.container_exited(
                    pod,
                    &cid,
                    ExitInfo::vm_gone(
                        crate::record::REASON_ERROR,
                        "the container is unknown to the agent",
                    ),
                ),
                Err(e) => log::debug!("container {cid}: {}", error_chain(&e)),
            }
        }
    }

    /// Starts forwarding a container's output to its log file (nothing without a log path).
    pub(crate) fn start_forwarders(
        self: &Arc<Self>,
        agent: &ReconnectingClient,
        rec: &ContainerRecord,
    ) -> Result<Option<LogHandle>> {
        let Some(path) = &rec.log_path else {
            return Ok(None);
        };
        let cursor = self.layout.log_cursor(&rec.pod_id, &rec.id);
        let writer = Arc::new(Mutex::new(LogWriter::open_with_cursor(path, &cursor)?));
        let streams: &[LogStream] = if rec.tty {
            &[LogStream::Stdout]
        } else {
            &[LogStream::Stdout, LogStream::Stderr]
        };
        let forwarders = Forwarders::new(streams.len() as u8);
        for &stream in streams {
            let inner = self.clone();
            let (agent, writer, fwd) = (agent.clone(), writer.clone(), forwarders.clone());
            let cid = rec.id.clone();
            let name = format!("log-{}-{}", &stream.name()[3..], rec.id);
            let spawned = self.spawn(name, move || {
                let pb_stream = match stream {
                    LogStream::Stdout => pb::Stream::STREAM_STDOUT,
                    LogStream::Stderr => pb::Stream::STREAM_STDERR,
                };
                forward(stream, &writer, &fwd, &inner.shutdown, |offset| {
                    // Acknowledged reads: the agent keeps what it returns until a later read
                    // says it is in the log, so a read may be repeated after a lost connection
                    // (or by the next hyperd) without losing or doubling a byte.
                    match agent.read_stream_from(&cid, "", pb_stream, offset, 0, POLL_WAIT) {
                        Ok(r) => Ok(StreamChunk {
                            data: r.data,
                            eof: r.eof,
                            dropped: r.dropped_bytes,
                            offset: r.offset,
                            acknowledged: r.acknowledged,
                        }),
                        Err(e) if is_not_found(&e) => Err(ReadFailure::Gone),
                        Err(e) => Err(ReadFailure::Retry(error_chain(&e))),
                    }
                });
            });
            if let Err(e) = spawned {
                forwarders.stop();
                return Err(e);
            }
        }
        Ok(Some(LogHandle { forwarders, writer }))
    }
}

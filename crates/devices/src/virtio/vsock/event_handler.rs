//! The device worker: an epoll loop over the queue eventfds, the kill eventfd, the listener and
//! every connection's Unix stream, driving the queue handlers and the muxer.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Interest, Muxer, Poller};
use super::packet::MAX_PKT_LEN;
use super::queues::{process_rx, process_tx, EVQ, RXQ, TXQ};
use super::ratelimit::{rl_log, LogLimiter};
use crate::virtio::{ActivateContext, Interrupt, KILL_TOKEN};
use crate::GuestMemory;

/// [`Poller`] over an epoll instance shared with the event loop.
#[derive(Debug)]
pub struct EpollPoller {
    epoll: Arc<Epoll>,
}

impl Poller for EpollPoller {
    fn update(&mut self, fd: RawFd, token: u64, old: Interest, new: Interest) -> io::Result<()> {
        let mut set = EventSet::empty();
        if new.read {
            set |= EventSet::IN;
        }
        if new.write {
            set |= EventSet::OUT;
        }
        let op = match (old.is_none(), new.is_none()) {
            (true, true) => return Ok(()),
            (true, false) => ControlOperation::Add,
            (false, true) => ControlOperation::Delete,
            (false, false) => ControlOperation::Modify,
        };
        self.epoll.ctl(op, fd, EpollEvent::new(set, token))
    }
}

/// Everything the worker thread owns.
#[derive(Debug)]
pub struct VsockWorker {
    mem: GuestMemory,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Interrupt,
    epoll: Arc<Epoll>,
    pub(crate) muxer: Muxer<EpollPoller>,
    payload: Vec<u8>,
    scratch: Vec<u8>,
    log: LogLimiter,
}

impl VsockWorker {
    /// Set up the worker for an activated device. `ctx` must hold exactly three queues.
    pub fn new(
        ctx: ActivateContext,
        guest_cid: u64,
        uds_path: PathBuf,
        listener: UnixListener,
    ) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        for (i, evt) in ctx.queue_evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let poller = EpollPoller {
            epoll: Arc::clone(&epoll),
        };
        let muxer = Muxer::new(guest_cid, uds_path, listener, poller)?;
        Ok(VsockWorker {
            mem: ctx.mem,
            queues: ctx.queues,
            queue_evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            epoll,
            muxer,
            payload: Vec::with_capacity(MAX_PKT_LEN as usize),
            scratch: vec![0; MAX_PKT_LEN as usize],
            log: LogLimiter::default(),
        })
    }

    /// Thread body: run until `kill` becomes readable.
    pub fn run(mut self, kill: EventFd) {
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        ) {
            log::error!("vsock: cannot watch the kill eventfd: {e}");
            return;
        }
        // Buffers the guest queued before DRIVER_OK.
        self.process_queues();
        loop {
            match self.run_once(-1) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::error!("vsock: worker stopped: {e}");
                    return;
                }
            }
        }
    }

    /// Wait for events (at most `max_wait_ms`, -1 for the next deadline or forever) and handle
    /// them. Returns `Ok(false)` when told to stop.
    pub fn run_once(&mut self, max_wait_ms: i32) -> io::Result<bool> {
        let mut timeout = max_wait_ms;
        if let Some(deadline) = self.muxer.next_deadline() {
            let ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .saturating_add(1);
            let ms = i32::try_from(ms).unwrap_or(i32::MAX);
            if timeout < 0 || ms < timeout {
                timeout = ms;
            }
        }
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let set = ev.event_set();
            match ev.data() {
                KILL_TOKEN => return Ok(false),
                t if t == RXQ as u64 || t == TXQ as u64 || t == EVQ as u64 => {
                    // Non-blocking eventfd: WouldBlock just means someone else drained it.
                    let _ = self.queue_evts[t as usize].read();
                }
                t => {
                    let err = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                    let readable = err || set.intersects(EventSet::IN | EventSet::READ_HANG_UP);
                    let writable = err || set.contains(EventSet::OUT);
                    self.muxer.handle_event(t, readable, writable);
                }
            }
        }
        self.muxer.process_timeouts(Instant::now());
        self.process_queues();
        Ok(true)
    }

    /// Move packets both ways until TX makes no more progress, then interrupt the guest once.
    pub fn process_queues(&mut self) {
        let (rxq, rest) = self.queues.split_at_mut(TXQ);
        let (rxq, txq) = (&mut rxq[RXQ], &mut rest[0]);
        let mut rx_used = 0;
        let mut tx_used = 0;
        loop {
            rx_used += process_rx(
                &self.mem,
                rxq,
                &mut self.muxer,
                &mut self.scratch,
                &mut self.log,
            );
            let n = process_tx(
                &self.mem,
                txq,
                &mut self.muxer,
                &mut self.payload,
                &mut self.log,
            );
            tx_used += n;
            if n == 0 {
                break;
            }
        }
        let mut notify = false;
        for (used, q) in [(rx_used, &mut *rxq), (tx_used, &mut *txq)] {
            if used > 0 {
                notify |= q.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                rl_log!(self.log, error, "vsock: cannot interrupt the guest: {e}");
            }
        }
    }
}

//! The virtio-vsock device: config space, feature bits and the worker's lifecycle.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use super::event_handler::VsockWorker;
use super::VsockError;
use crate::virtio::{
    device_type, ActivateContext, ActivateError, VirtioDevice, Worker, VIRTIO_F_VERSION_1,
};

/// Queue size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// CID the guest gets unless configured otherwise.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// virtio-vsock with the Firecracker-style Unix socket backend. See [`super`].
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    acked_features: u64,
    worker: Option<Worker>,
}

impl Vsock {
    /// A device giving the guest `guest_cid` and listening for host clients on `uds_path`, which
    /// must not exist yet (it is removed again when the device is dropped). Guest connections to
    /// port `P` go to `<uds_path>_<P>`.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Self, VsockError> {
        // 0, 1 and 2 are reserved, u32::MAX is VMADDR_CID_ANY; Linux keeps CIDs in 32 bits.
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let uds_path = uds_path.into();
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        let vsock = Vsock {
            guest_cid,
            uds_path,
            listener,
            acked_features: 0,
            worker: None,
        };
        // Constructed first so that Drop removes the socket file on this error too.
        vsock
            .listener
            .set_nonblocking(true)
            .map_err(VsockError::Listener)?;
        Ok(vsock)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where host clients connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn stop_worker(&mut self) -> bool {
        Worker::stop_slot(&mut self.worker)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets are implied when no socket-type feature is negotiated.
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != QUEUE_SIZES.len() || ctx.queue_evts.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len().min(ctx.queue_evts.len()),
            });
        }
        self.stop_worker();
        let listener = self.listener.try_clone().map_err(ActivateError::Worker)?;
        let state = VsockWorker::new(ctx, self.guest_cid, self.uds_path.clone(), listener)
            .map_err(ActivateError::Worker)?;
        let worker = Worker::spawn("vsock".to_string(), move |kill| state.run(kill))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let stopped = self.stop_worker();
        self.acked_features = 0;
        stopped
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("vsock: cannot remove {}: {e}", self.uds_path.display());
            }
        }
    }
}

//! What the shim knows of each task: kind, pod, stdio, status, exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::watch;

use crate::stdio::{StdinCopy, StdioPaths};

/// CRI annotation: "sandbox" or "container".
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation: the pod's sandbox id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// What a task is to the shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// CRI's sandbox (pause) container: the pod's VM itself, nothing runs for it.
    Sandbox,
    /// A CRI container in its sandbox's VM.
    Container,
    /// A container without CRI annotations (`ctr run`): a VM of its own.
    Standalone,
}

impl Kind {
    /// The kind from the OCI spec's annotations.
    pub fn from_annotations(a: &serde_json::Map<String, serde_json::Value>) -> Kind {
        match a.get(CONTAINER_TYPE).and_then(|v| v.as_str()) {
            Some("sandbox") => Kind::Sandbox,
            Some("container") => Kind::Container,
            _ => Kind::Standalone,
        }
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The status containerd reports (128 + signal for a signal).
    pub status: u32,
    /// Unix nanoseconds.
    pub at_nanos: i64,
}

/// Process status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Exited.
    Stopped,
}

/// One process (a task's init or an exec).
pub struct Proc {
    /// containerd's stdio.
    pub stdio: StdioPaths,
    /// Exec `process` JSON (execs only).
    pub spec: Vec<u8>,
    /// pid (the agent's, or the VMM's for a sandbox).
    pub pid: Mutex<u32>,
    /// Status.
    pub status: Mutex<Status>,
    /// The exit, once known.
    pub exit: watch::Sender<Option<Exit>>,
    /// Output copies to finish before the exit is announced.
    pub output: Mutex<Vec<JoinHandle<()>>>,
    /// The stdin copy while it runs.
    pub stdin: Mutex<Option<StdinCopy>>,
}

impl Proc {
    /// A created process.
    pub fn new(stdio: StdioPaths, spec: Vec<u8>) -> Proc {
        Proc {
            stdio,
            spec,
            pid: Mutex::new(0),
            status: Mutex::new(Status::Created),
            exit: watch::channel(None).0,
            output: Mutex::new(Vec::new()),
            stdin: Mutex::new(None),
        }
    }

    /// Starts copying `copies`' streams for this process.
    pub fn attach(&self, copies: crate::stdio::Copies) {
        *self
            .output
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = copies.output;
        *self
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = copies.stdin;
    }

    /// The exit, if any.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// A task.
pub struct Task {
    /// containerd's id.
    pub id: String,
    /// Kind.
    pub kind: Kind,
    /// The pod (sandbox manager id) it runs in.
    pub pod_id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// The network namespace whose tap this task set up (sandboxes).
    pub netns: Option<PathBuf>,
    /// The init process.
    pub init: Proc,
    /// Exec processes by exec id.
    pub execs: Mutex<HashMap<String, std::sync::Arc<Proc>>>,
}

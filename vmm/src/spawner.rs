//! The thread that starts the threads the VMM needs after start-up (each
//! boot's vCPUs, alert-hook runs).
//!
//! Why a thread of its own: a seccomp filter is inherited by every thread a
//! thread creates, and the child's own filter only narrows it. If the event
//! loop created the vCPU threads, its filter would have to allow everything
//! a vCPU does, and its own list could never be tighter than the union. The
//! spawner is started before any filter, installs one that allows thread
//! creation plus what its children need (`seccomp::Kind::Spawner`), and
//! does nothing but create threads on request; each child then installs its
//! own filter first thing.

use std::io;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

type Job = (
    String,
    Box<dyn FnOnce() + Send>,
    mpsc::Sender<io::Result<JoinHandle<()>>>,
);

static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();

/// Starts the spawner thread; call once, before the event loop's filter.
pub fn start() -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            crate::seccomp::install(crate::seccomp::Kind::Spawner);
            for (name, f, reply) in rx {
                let _ = reply.send(std::thread::Builder::new().name(name).spawn(f));
            }
        })?;
    SPAWNER
        .set(Mutex::new(tx))
        .map_err(|_| io::Error::other("the spawner was started twice"))
}

/// Starts `f` on a new thread named `name`: through the spawner once it
/// runs, directly before (start-up, unit tests).
pub fn spawn<F>(name: String, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let Some(tx) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(f);
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((name, Box::new(f), reply_tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

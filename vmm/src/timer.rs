//! Event-loop timers that can never block the loop.
//!
//! epoll reports a timerfd readable when it expired, but anything that
//! re-arms or clears it before the read (a guest writing the watchdog's
//! ports from a vCPU thread, a later power action) makes a blocking read
//! wait for the next expiry, which may be never. So every loop timer is
//! `O_NONBLOCK` and a read that finds nothing (EAGAIN) means "no expiry".

use std::os::fd::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

/// A monotonic, close-on-exec, non-blocking timerfd.
pub fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let t = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    let fd = t.as_raw_fd();
    // SAFETY: fcntl on a descriptor this TimerFd owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; only the file status flags change.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(t)
}

/// Consumes the timer's expirations; false when there were none (it was
/// re-armed or cleared after epoll reported it).
pub fn take_expiry(t: &mut TimerFd) -> bool {
    match t.wait() {
        Ok(n) => n > 0,
        Err(e) if e.errno() == libc::EAGAIN => false,
        Err(e) => {
            tracing::warn!("timerfd read: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_timer_cleared_after_it_fired_reads_as_no_expiry_instead_of_blocking() {
        let mut t = nonblocking_timer().unwrap();
        t.reset(Duration::from_millis(1), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // Re-armed far in the future after expiring, as a guest can do.
        t.reset(Duration::from_secs(3600), None).unwrap();
        let start = Instant::now();
        assert!(!take_expiry(&mut t));
        assert!(start.elapsed() < Duration::from_secs(1));
        t.clear().unwrap();
        assert!(!take_expiry(&mut t));
    }

    #[test]
    fn an_expired_timer_reads_as_expired_once() {
        let mut t = nonblocking_timer().unwrap();
        t.reset(Duration::from_millis(1), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(take_expiry(&mut t));
        assert!(!take_expiry(&mut t));
    }
}

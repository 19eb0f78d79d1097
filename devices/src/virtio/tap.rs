//! A TAP device opened through `/dev/net/tun`, with virtio-net headers.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`): what the TAP prepends
/// and expects on every frame.
pub const VNET_HDR_LEN: usize = 12;

pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// False for the socket stand-ins tests use: TUN ioctls are skipped.
    is_tap: bool,
    /// One queue of a multi-queue TAP (`IFF_MULTI_QUEUE`).
    multi_queue: bool,
    /// Whether the kernel steers frames to this queue (`TUNSETQUEUE`).
    attached: bool,
}

impl Tap {
    /// Opens (creating it if absent and permitted) the TAP `name`, with
    /// `IFF_NO_PI | IFF_VNET_HDR`, a 12-byte vnet header, no offloads yet,
    /// nonblocking.
    pub fn open(name: &str) -> io::Result<Self> {
        Self::open_queue(name, false)
    }

    /// Opens up to `n` queues of the TAP `name` (one per virtio-net queue
    /// pair). The kernel refuses to mix: a TAP made without `multi_queue`
    /// takes only single-queue opens and one made with it only multi-queue
    /// ones (EINVAL either way), so the other kind is tried on EINVAL, and
    /// a single-queue TAP gives one queue whatever `n` is (the caller
    /// offers fewer pairs). Every queue but the first is detached
    /// ([`Self::set_attached`]): until the driver enables more pairs the
    /// kernel steers every frame to the first.
    pub fn open_queues(name: &str, n: usize) -> io::Result<Vec<Self>> {
        let einval = |e: &io::Error| e.raw_os_error() == Some(libc::EINVAL);
        let first = match Self::open_queue(name, n > 1) {
            Err(e) if einval(&e) => Self::open_queue(name, n <= 1)?,
            r => r?,
        };
        let multi = first.multi_queue;
        let mut taps = vec![first];
        while multi && taps.len() < n {
            // A queue that will not open (the TAP's queue limit, a file
            // limit) leaves the VM fewer pairs, not no network.
            match Self::open_queue(name, true).and_then(|mut q| q.set_attached(false).map(|()| q)) {
                Ok(q) => taps.push(q),
                Err(e) => {
                    tracing::warn!("TAP {name}: queue {} of {n}: {e}", taps.len());
                    break;
                }
            }
        }
        Ok(taps)
    }

    fn open_queue(name: &str, multi_queue: bool) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface names are 1 to 15 bytes without '/'",
            ));
        }
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        let mq = if multi_queue {
            libc::IFF_MULTI_QUEUE
        } else {
            0
        };
        ifr.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | mq) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Self {
            fd: file.into(),
            name: name.to_owned(),
            is_tap: true,
            multi_queue,
            attached: true,
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// A stand-in over any frame-preserving fd (a `SOCK_SEQPACKET` socket in
    /// tests and the fuzz targets). It must already be nonblocking.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd,
            name: "test".into(),
            is_tap: false,
            multi_queue: false,
            attached: true,
        }
    }

    /// `TUNSETQUEUE`: whether the kernel steers frames to this queue of a
    /// multi-queue TAP (and takes frames written to it). A single-queue TAP
    /// stays attached. Asking for the state it is in does nothing (the
    /// kernel would answer EINVAL).
    pub fn set_attached(&mut self, on: bool) -> io::Result<()> {
        if !self.is_tap || !self.multi_queue || self.attached == on {
            return Ok(());
        }
        // SAFETY: ifreq is plain old data; all zeros is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        let flag = if on {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        ifr.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE reads one `ifreq`, which outlives the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETQUEUE, &ifr) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.attached = on;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `TUNSETOFFLOAD`: which offloaded (partial-checksum, GSO) frames the
    /// TAP may hand us, i.e. what the guest accepts.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One frame (vnet header first) into `buf`; `WouldBlock` when none is
    /// waiting. Returns the frame's length.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.readv(&[libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }])
    }

    /// Sends one frame (vnet header first).
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        self.writev(&[libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }])
    }

    /// One frame (vnet header first) into `iovs`.
    pub(crate) fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        let cnt = iovs.len().min(super::iov::IOV_MAX) as libc::c_int;
        // SAFETY: the iovecs point to writable memory the caller keeps alive
        // (guest memory held by an `Arc`, or a local buffer).
        let r = unsafe { libc::readv(self.fd.as_raw_fd(), iovs.as_ptr(), cnt) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// One frame (vnet header first) from `iovs`.
    pub(crate) fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        if iovs.len() > super::iov::IOV_MAX {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: the iovecs point to readable memory the caller keeps alive.
        let r = unsafe {
            libc::writev(
                self.fd.as_raw_fd(),
                iovs.as_ptr(),
                iovs.len() as libc::c_int,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

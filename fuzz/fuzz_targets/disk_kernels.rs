//! Kernels from the guest's own disk (`vmm::disk_kernels`): the customer
//! controls every byte of that disk, and the VMM reads its partition table
//! and ext4 file system (through the `ext4-view` crate) at every boot.
//!
//! Checks: listing and reading never panic; every version found is one
//! the module accepts (no path separator, space or control character),
//! oldest first; what is read stays within the limits given (the kernel
//! at most `MAX_KERNEL`, the initrd at most the guest's memory, here
//! 1 MiB).
#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm::disk_kernels::{compare_versions, list, read, valid_version, MAX_KERNEL};

const MAX_INITRD: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and
    // returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(data).expect("write to a memfd");
    let f = Arc::new(f);
    if let Ok(all) = list(&f) {
        assert!(!all.is_empty());
        for k in &all {
            assert!(valid_version(&k.version), "{k:?}");
        }
        for w in all.windows(2) {
            assert!(compare_versions(&w[0].version, &w[1].version).is_le());
        }
    }
    if let Ok(b) = read(&f, None, MAX_INITRD) {
        assert!(b.image.len() as u64 <= MAX_KERNEL);
        assert!(b.initrd.map_or(0, |i| i.len()) as u64 <= MAX_INITRD);
    }
});

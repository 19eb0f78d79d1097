//! Kernels installed on the guest's own disk (issue 12, item 4): the
//! `vmlinuz-VERSION` and `initrd.img-VERSION` files of the root disk's
//! `/boot`, as Debian's `linux-image-*` packages leave them, read with the
//! pure-Rust `ext4-view` reader (read-only, journal replayed in memory:
//! nothing is ever written to the disk). So `apt install linux-image-…;
//! reboot` upgrades the kernel as it would on a co-located machine.
//!
//! The disk is the customer's: everything here is hostile input. The
//! reader is memory-safe; what this module adds is bounds (sizes checked
//! before a file is read, at most [`MAX_CANDIDATES`] file systems tried,
//! names and versions restricted to a safe alphabet), and it reads through
//! the disk's descriptor opened at start-up (`pread`), so the sandbox needs
//! no new path.
//!
//! Where the file system is: the whole disk (an image made by `mkfs.ext4`
//! on the file, like the project's server image), else each partition of
//! an MBR or GPT partition table, in order; in each, `/boot` first (the
//! root file system), then `/` (a separate `/boot` partition).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read};

/// The largest kernel image read (Debian's are ~8 MiB).
pub const MAX_KERNEL: u64 = 128 << 20;

/// The largest initrd read (Debian's are 30-70 MiB), whatever the
/// guest's memory: the VMM holds it in its own memory while it boots.
pub const MAX_INITRD: u64 = 512 << 20;

/// The largest directory looked through (`/boot`, or `/` for a separate
/// boot partition).
const MAX_DIR: u64 = 1 << 20;

/// File systems looked at, at most (the whole disk and partitions).
pub const MAX_CANDIDATES: usize = 16;

/// A kernel found on the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskKernel {
    /// As in the file name: `vmlinuz-<version>`.
    pub version: String,
    /// Paths inside the file system where it was found.
    pub kernel_path: String,
    pub initrd_path: Option<String>,
}

/// A kernel read from the disk, ready to load.
pub struct DiskBoot {
    pub kernel: DiskKernel,
    pub image: Arc<[u8]>,
    pub initrd: Option<Arc<[u8]>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskKernelError {
    #[error(
        "the disk has no ext4 file system with kernels in /boot (none of {0} places looked at)"
    )]
    NoKernels(usize),
    #[error("no kernel {want} in the disk's /boot (there: {there})")]
    NoSuchVersion { want: String, there: String },
    #[error("{path} on the disk is {size} bytes, more than the {limit} allowed")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("cannot read {path} on the disk: {reason}")]
    Read { path: String, reason: String },
}

/// Reads the file system at `offset` bytes into the disk, through the
/// descriptor opened at start-up.
struct DiskReader {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

impl Ext4Read for DiskReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let at = self
            .offset
            .checked_add(start_byte)
            .filter(|at| {
                at.checked_add(dst.len() as u64)
                    .is_some_and(|end| end <= self.len)
            })
            .ok_or("read past the end of the disk")?;
        self.file.read_exact_at(dst, at)?;
        Ok(())
    }
}

/// The kernel names that mean the disk's: `disk` (the newest there) and
/// `disk:VERSION`. `Some(None)` for the newest, `Some(Some(v))` for a
/// version, `None` for a library name.
pub fn parse_name(name: &str) -> Option<Option<&str>> {
    match name.strip_prefix("disk") {
        Some("") => Some(None),
        Some(rest) => rest
            .strip_prefix(':')
            .filter(|v| valid_version(v))
            .map(Some),
        None => None,
    }
}

/// Is `name` a disk kernel's name, well formed?
pub fn is_disk_name(name: &str) -> bool {
    parse_name(name).is_some()
}

/// Is `v` a version this module accepts (Debian's: `6.1.0-28-amd64`,
/// `6.12.12+bpo-amd64`)? Anything else in `/boot` is ignored, so a name
/// never carries a path separator, a space or a control character into
/// a log line, an event or the state file.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_' | '~'))
}

/// Orders versions as people read them: runs of digits by value
/// (`6.1.0-9` before `6.1.0-28`), the rest byte by byte.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ra, rb) = (runs(a), runs(b));
    for (x, y) in ra.iter().zip(rb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ra.len().cmp(&rb.len())
}

/// Byte offsets where a file system may start: the whole disk, then the
/// partitions of an MBR or a GPT (at most [`MAX_CANDIDATES`] in all).
fn candidate_offsets(file: &File, len: u64) -> Vec<u64> {
    let mut out = vec![0];
    let mut mbr = [0u8; 512];
    if file.read_exact_at(&mut mbr, 0).is_err() || mbr[510..512] != [0x55, 0xAA] {
        return out;
    }
    let mut gpt = false;
    for i in 0..4 {
        let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
        let kind = e[4];
        let lba = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]]));
        if kind == 0xEE {
            gpt = true;
        } else if kind != 0 && lba != 0 {
            out.push(lba.saturating_mul(512));
        }
    }
    if gpt {
        gpt_offsets(file, &mut out);
    }
    out.retain(|&o| o < len);
    out.truncate(MAX_CANDIDATES);
    out
}

/// The partitions of a GPT (header at LBA 1), in table order.
fn gpt_offsets(file: &File, out: &mut Vec<u64>) {
    let mut hdr = [0u8; 92];
    if file.read_exact_at(&mut hdr, 512).is_err() || &hdr[..8] != b"EFI PART" {
        return;
    }
    let u64_at = |b: &[u8], i: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(v)
    };
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let table = u64_at(&hdr, 72);
    let count = u32_at(&hdr, 80).min(128);
    let size = u32_at(&hdr, 84);
    if !(128..=4096).contains(&size) {
        return;
    }
    let mut entry = vec![0u8; size as usize];
    for i in 0..u64::from(count) {
        let Some(at) = table
            .checked_mul(512)
            .and_then(|t| t.checked_add(i * u64::from(size)))
        else {
            return;
        };
        if file.read_exact_at(&mut entry, at).is_err() {
            return;
        }
        if entry[..16].iter().all(|&b| b == 0) {
            continue;
        }
        out.push(u64_at(&entry, 32).saturating_mul(512));
        if out.len() >= MAX_CANDIDATES {
            return;
        }
    }
}

fn read_err(path: &str) -> impl Fn(Ext4Error) -> DiskKernelError + '_ {
    move |e| DiskKernelError::Read {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

/// The kernels of one file system: `DIR/vmlinuz-VERSION` files (symbolic
/// links followed inside the file system) with their initrds, in `/boot`
/// else at the top.
fn kernels_in(fs: &Ext4) -> Vec<DiskKernel> {
    for dir in ["/boot", "/"] {
        // Never through a symbolic link: `ext4-view` reads a link's target
        // whole, at whatever size its inode claims (the fuzz target found
        // a 4 GB allocation so). A directory's entries are counted only
        // when not empty, and a hostile one may be any number of blocks
        // of empty entries: bounded by its size (a real /boot is a few
        // KiB).
        let Ok(m) = fs.symlink_metadata(dir) else {
            continue;
        };
        if !m.is_dir() || m.len() > MAX_DIR {
            continue;
        }
        let Ok(entries) = fs.read_dir(dir) else {
            continue;
        };
        let mut kernels = Vec::new();
        let mut initrds = std::collections::HashSet::new();
        // A directory the guest filled with names: bounded all the same.
        for entry in entries.take(4096).flatten() {
            let name = entry.file_name();
            let Ok(name) = name.as_str() else { continue };
            let (version, is_kernel) = match (
                name.strip_prefix("vmlinuz-"),
                name.strip_prefix("initrd.img-"),
            ) {
                (Some(v), _) => (v, true),
                (_, Some(v)) => (v, false),
                _ => continue,
            };
            // Regular files only (the entry's own inode: nothing followed).
            if !valid_version(version)
                || !entry
                    .metadata()
                    .is_ok_and(|m| m.file_type().is_regular_file())
            {
                continue;
            }
            if is_kernel {
                kernels.push(version.to_string());
            } else {
                initrds.insert(version.to_string());
            }
        }
        let base = if dir == "/" { "" } else { dir };
        let mut found: Vec<DiskKernel> = kernels
            .into_iter()
            .map(|version| DiskKernel {
                kernel_path: format!("{base}/vmlinuz-{version}"),
                initrd_path: initrds
                    .contains(&version)
                    .then(|| format!("{base}/initrd.img-{version}")),
                version,
            })
            .collect();
        if !found.is_empty() {
            found.sort_by(|a, b| compare_versions(&a.version, &b.version));
            return found;
        }
    }
    Vec::new()
}

/// Block groups a file system may claim at most. `ext4-view` allocates
/// its table of group descriptors from the superblock's claim before it
/// reads one (the fuzz target found a 32 GiB allocation); 2^18 groups of
/// the usual 128 MiB are a 32 TiB file system.
const MAX_GROUPS: u64 = 1 << 18;

/// Does the superblock at `offset` describe an ext4 file system that fits
/// on the disk and has a bounded number of block groups? Checked here,
/// before `ext4-view` trusts it.
fn plausible_superblock(file: &File, offset: u64, len: u64) -> Option<()> {
    let mut sb = [0u8; 0x158];
    file.read_exact_at(&mut sb, offset.checked_add(1024)?)
        .ok()?;
    let u32_at = |i: usize| u32::from_le_bytes([sb[i], sb[i + 1], sb[i + 2], sb[i + 3]]);
    // The magic 0xEF53 at 56.
    if sb[56..58] != [0x53, 0xEF] {
        return None;
    }
    let blocks = (u64::from(u32_at(0x150)) << 32) | u64::from(u32_at(0x4));
    let first_data_block = u64::from(u32_at(0x14));
    let log_block_size = u32_at(0x18);
    let blocks_per_group = u64::from(u32_at(0x20));
    if log_block_size > 6 {
        return None;
    }
    let block_size = 1024u64 << log_block_size;
    // A group's block bitmap is one block: at most 8 x block size blocks
    // (mke2fs -g); fewer than 8 is no file system anyone made.
    if !(8..=8 * block_size).contains(&blocks_per_group) {
        return None;
    }
    let fs_bytes = blocks.checked_mul(block_size)?;
    if fs_bytes > len.checked_sub(offset)? {
        return None;
    }
    let groups = blocks
        .checked_sub(first_data_block)?
        .div_ceil(blocks_per_group);
    (groups <= MAX_GROUPS).then_some(())
}

fn load_fs(file: &Arc<File>, offset: u64, len: u64) -> Option<Ext4> {
    plausible_superblock(file, offset, len)?;
    Ext4::load(Box::new(DiskReader {
        file: file.clone(),
        offset,
        len,
    }))
    .ok()
}

/// The disk's size: a file's length, or a block device's (whose
/// `st_size` is 0), as the block device sizes it.
fn disk_len(file: &File) -> u64 {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0)).unwrap_or(0)
}

/// The first file system on the disk that has kernels, and its kernels,
/// oldest first.
fn find(file: &Arc<File>) -> Result<(Ext4, Vec<DiskKernel>), DiskKernelError> {
    let len = disk_len(file);
    let offsets = candidate_offsets(file, len);
    for &off in &offsets {
        if let Some(fs) = load_fs(file, off, len) {
            let k = kernels_in(&fs);
            if !k.is_empty() {
                return Ok((fs, k));
            }
        }
    }
    Err(DiskKernelError::NoKernels(offsets.len()))
}

/// Every kernel on the disk, oldest first (the first file system that has
/// any).
pub fn list(file: &Arc<File>) -> Result<Vec<DiskKernel>, DiskKernelError> {
    find(file).map(|(_, all)| all)
}

/// Reads kernel `version` (the newest with `None`) and its initrd; the
/// initrd may be at most `max_initrd` bytes (what guest memory can hold)
/// and [`MAX_INITRD`].
pub fn read(
    file: &Arc<File>,
    version: Option<&str>,
    max_initrd: u64,
) -> Result<DiskBoot, DiskKernelError> {
    let (fs, all) = find(file)?;
    read_from(&fs, &all, version, max_initrd)
}

/// [`read`] from a file system [`find`] found, with its kernels `all`.
fn read_from(
    fs: &Ext4,
    all: &[DiskKernel],
    version: Option<&str>,
    max_initrd: u64,
) -> Result<DiskBoot, DiskKernelError> {
    let chosen = match version {
        None => all.last().cloned(),
        Some(v) => all.iter().find(|k| k.version == v).cloned(),
    };
    let Some(kernel) = chosen else {
        return Err(DiskKernelError::NoSuchVersion {
            want: version.unwrap_or_default().to_string(),
            there: all
                .iter()
                .map(|k| k.version.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    // One lookup per file: the size checked is the size read.
    let bounded = |path: &str, limit: u64| -> Result<Arc<[u8]>, DiskKernelError> {
        let mut f = fs.open(path).map_err(read_err(path))?;
        let size = f.metadata().len();
        if size > limit {
            return Err(DiskKernelError::TooLarge {
                path: path.to_string(),
                size,
                limit,
            });
        }
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let mut at = 0;
        while at < data.len() {
            match f.read_bytes(&mut data[at..]).map_err(read_err(path))? {
                0 => break,
                n => at += n,
            }
        }
        data.truncate(at);
        Ok(data.into())
    };
    let image = bounded(&kernel.kernel_path, MAX_KERNEL)?;
    let initrd = match &kernel.initrd_path {
        Some(p) => Some(bounded(p, max_initrd.min(MAX_INITRD))?),
        None => None,
    };
    Ok(DiskBoot {
        kernel,
        image,
        initrd,
    })
}

/// The VM's first disk, kept open for its kernels (opened at start-up,
/// before the sandbox: no path is opened again), and the versions found
/// there at the last look (what `kernel list` shows: the control socket
/// never waits on the customer's disk).
pub struct BootDisk {
    file: Arc<File>,
    found: Vec<String>,
}

impl BootDisk {
    /// Opens `path` read-only and looks for kernels once.
    pub fn open(path: &std::path::Path) -> std::io::Result<BootDisk> {
        let file = Arc::new(File::open(path)?);
        let mut d = BootDisk {
            file,
            found: Vec::new(),
        };
        d.refresh();
        Ok(d)
    }

    /// Looks again (at each boot: the guest may have installed a kernel).
    pub fn refresh(&mut self) {
        self.note(list(&self.file).ok().as_deref());
    }

    /// Keeps the versions of a look's kernels (none when it failed).
    fn note(&mut self, all: Option<&[DiskKernel]>) {
        self.found = all
            .unwrap_or_default()
            .iter()
            .map(|k| k.version.clone())
            .collect();
    }

    /// The versions found at the last look, oldest first.
    pub fn found(&self) -> &[String] {
        &self.found
    }

    /// What a boot of `version` (the newest with `None`) loads: kernel
    /// and initrd read now, `cmdline` as configured (the customer's
    /// system needs its `root=`).
    pub fn choice(
        &mut self,
        version: Option<&str>,
        cmdline: &str,
        max_initrd: u64,
    ) -> Result<crate::config::KernelChoice, DiskKernelError> {
        // One look serves the boot and the list.
        let found = find(&self.file);
        self.note(found.as_ref().ok().map(|(_, all)| all.as_slice()));
        let (fs, all) = found?;
        let b = read_from(&fs, &all, version, max_initrd)?;
        let v = &b.kernel.version;
        Ok(crate::config::KernelChoice {
            label: format!("disk:{v}"),
            kernel: crate::boot::Image::Bytes {
                label: format!("{} on the VM's disk", b.kernel.kernel_path),
                data: b.image,
            },
            initrd: b.initrd.map(|data| crate::boot::Image::Bytes {
                label: format!(
                    "{} on the VM's disk",
                    b.kernel.initrd_path.as_deref().unwrap_or_default()
                ),
                data,
            }),
            cmdline: cmdline.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vmm-diskk-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// An ext4 image of `root`'s contents, as `resources/build-image.sh`
    /// makes the server's (`mkfs.ext4 -d`, no loop mount).
    fn ext4_of(root: &Path, image: &Path, size_mib: u32) {
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(root)
            .arg(image)
            .arg(format!("{size_mib}M"))
            .output()
            .expect("mkfs.ext4 (e2fsprogs) runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn open(p: &Path) -> Arc<File> {
        Arc::new(File::open(p).unwrap())
    }

    fn debian_boot(root: &Path, versions: &[&str]) {
        let boot = root.join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        for v in versions {
            std::fs::write(boot.join(format!("vmlinuz-{v}")), format!("kernel {v}")).unwrap();
            std::fs::write(boot.join(format!("initrd.img-{v}")), format!("initrd {v}")).unwrap();
            std::fs::write(boot.join(format!("config-{v}")), "x").unwrap();
        }
    }

    /// A scratch directory `tag` and in it a 16 MiB image of a root whose
    /// /boot holds `versions` (and what `extra` adds to that root).
    fn boot_image(tag: &str, versions: &[&str], extra: impl FnOnce(&Path)) -> (PathBuf, PathBuf) {
        let d = tmp(tag);
        let root = d.join("root");
        debian_boot(&root, versions);
        extra(&root);
        let img = d.join("disk.img");
        ext4_of(&root, &img, 16);
        (d, img)
    }

    #[test]
    fn disk_names_are_disk_or_disk_colon_a_version() {
        assert_eq!(parse_name("disk"), Some(None));
        assert_eq!(
            parse_name("disk:6.1.0-28-amd64"),
            Some(Some("6.1.0-28-amd64"))
        );
        for not in [
            "mini",
            "debian-6.1",
            "disk:",
            "disk:../x",
            "diskette",
            "disk:a b",
        ] {
            assert_eq!(parse_name(not), None, "{not}");
        }
    }

    #[test]
    fn versions_order_as_people_read_them() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("6.1.0-9-amd64", "6.1.0-28-amd64"), Less);
        assert_eq!(compare_versions("6.12.1-amd64", "6.1.0-28-amd64"), Greater);
        assert_eq!(compare_versions("6.1.0-28-amd64", "6.1.0-28-amd64"), Equal);
        assert_eq!(compare_versions("6.1", "6.1.0"), Less);
        assert!(valid_version("6.12.12+bpo-amd64"));
        for bad in [
            "",
            "../x",
            "6.1 x",
            "6.1/x",
            "vmlinuz",
            "6.1\n",
            &"1".repeat(65),
        ] {
            assert!(!valid_version(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_newest_kernel_in_boot_is_found_with_its_initrd_and_a_named_one_too() {
        let (d, img) = boot_image(
            "newest",
            &["6.1.0-9-amd64", "6.1.0-28-amd64", "6.1.0-10-amd64"],
            |root| {
                std::fs::write(root.join("boot/vmlinuz-not a version"), "x").unwrap();
                std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-28-amd64", root.join("vmlinuz"))
                    .unwrap();
            },
        );
        let f = open(&img);
        let all = list(&f).unwrap();
        let names: Vec<_> = all.iter().map(|k| k.version.as_str()).collect();
        assert_eq!(names, ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-28-amd64"]);
        let b = read(&f, None, 1 << 20).unwrap();
        assert_eq!(b.kernel.version, "6.1.0-28-amd64");
        assert_eq!(&*b.image, b"kernel 6.1.0-28-amd64");
        assert_eq!(b.initrd.as_deref(), Some(&b"initrd 6.1.0-28-amd64"[..]));
        let b = read(&f, Some("6.1.0-9-amd64"), 1 << 20).unwrap();
        assert_eq!(&*b.image, b"kernel 6.1.0-9-amd64");
        let e = read(&f, Some("5.10.0-1-amd64"), 1 << 20).err().unwrap();
        assert_eq!(
            e.to_string(),
            "no kernel 5.10.0-1-amd64 in the disk's /boot (there: 6.1.0-9-amd64, 6.1.0-10-amd64, 6.1.0-28-amd64)"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_disk_without_kernels_or_without_ext4_is_a_clear_error() {
        let d = tmp("none");
        let root = d.join("root");
        std::fs::create_dir_all(root.join("boot")).unwrap();
        let img = d.join("empty.img");
        ext4_of(&root, &img, 8);
        assert_eq!(list(&open(&img)).err(), Some(DiskKernelError::NoKernels(1)));
        let junk = d.join("junk.img");
        std::fs::write(&junk, vec![0xA5u8; 1 << 20]).unwrap();
        assert_eq!(
            list(&open(&junk)).err(),
            Some(DiskKernelError::NoKernels(1))
        );
        let empty = d.join("zero.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(read(&open(&empty), None, 1 << 20).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_initrd_larger_than_the_guest_can_hold_is_refused_before_it_is_read() {
        let (d, img) = boot_image("large", &["6.1.0-28-amd64"], |root| {
            std::fs::write(
                root.join("boot/initrd.img-6.1.0-28-amd64"),
                vec![7u8; 300_000],
            )
            .unwrap();
        });
        let e = read(&open(&img), None, 100_000).err().unwrap();
        assert_eq!(
            e,
            DiskKernelError::TooLarge {
                path: "/boot/initrd.img-6.1.0-28-amd64".into(),
                size: 300_000,
                limit: 100_000
            }
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn kernels_are_found_in_a_partition_of_an_mbr_disk_and_in_a_separate_boot_partition() {
        let d = tmp("mbr");
        let root = d.join("root");
        // A separate /boot partition: the files at its top.
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("vmlinuz-6.1.0-28-amd64"), "k").unwrap();
        let part = d.join("part.img");
        ext4_of(&root, &part, 8);
        let part_bytes = std::fs::read(&part).unwrap();
        // MBR: one Linux partition at LBA 2048.
        let mut disk = vec![0u8; 2048 * 512];
        let e = &mut disk[446..462];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&2048u32.to_le_bytes());
        e[12..16].copy_from_slice(&((part_bytes.len() / 512) as u32).to_le_bytes());
        disk[510] = 0x55;
        disk[511] = 0xAA;
        disk.extend_from_slice(&part_bytes);
        let img = d.join("disk.img");
        std::fs::write(&img, &disk).unwrap();
        let b = read(&open(&img), None, 1 << 20).unwrap();
        assert_eq!(b.kernel.version, "6.1.0-28-amd64");
        assert_eq!(b.kernel.kernel_path, "/vmlinuz-6.1.0-28-amd64");
        assert_eq!(b.initrd, None);
        // The image cut short after the superblock: an error.
        std::fs::write(&img, &disk[..2048 * 512 + 2048]).unwrap();
        assert!(read(&open(&img), None, 1 << 20).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_superblock_claiming_more_than_the_disk_or_too_many_groups_is_not_read_further() {
        let (d, img) = boot_image("claims", &["6.1.0-28-amd64"], |_| {});
        let good = std::fs::read(&img).unwrap();
        assert!(list(&open(&img)).is_ok());
        let patch = |at: usize, v: u32| {
            let mut b = good.clone();
            b[1024 + at..1024 + at + 4].copy_from_slice(&v.to_le_bytes());
            std::fs::write(&img, &b).unwrap();
        };
        // More blocks than the disk holds (the fuzz target's 32 GiB
        // allocation came from such a claim).
        patch(0x150, 0x10);
        assert_eq!(list(&open(&img)).err(), Some(DiskKernelError::NoKernels(1)));
        // Fewer than 8 blocks per group, or more than one bitmap block
        // can track: no file system anyone made (and the way to claim
        // millions of groups on a small disk).
        for bpg in [0, 1, 7, 8 * 65536 + 1] {
            patch(0x20, bpg);
            assert_eq!(list(&open(&img)).err(), Some(DiskKernelError::NoKernels(1)));
        }
        patch(0x18, 7);
        assert_eq!(list(&open(&img)).err(), Some(DiskKernelError::NoKernels(1)));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn symbolic_links_are_never_followed_neither_boot_nor_a_kernel() {
        let d = tmp("links");
        let root = d.join("root");
        // /boot a link to a directory of kernels; a kernel a link to one.
        debian_boot(&root.join("real"), &["6.1.0-28-amd64"]);
        std::os::unix::fs::symlink("real/boot", root.join("boot")).unwrap();
        let img = d.join("disk.img");
        ext4_of(&root, &img, 16);
        assert_eq!(list(&open(&img)).err(), Some(DiskKernelError::NoKernels(1)));
        std::fs::remove_dir_all(&root).unwrap();
        debian_boot(&root, &["6.1.0-28-amd64"]);
        std::os::unix::fs::symlink(
            "vmlinuz-6.1.0-28-amd64",
            root.join("boot/vmlinuz-6.1.0-99-amd64"),
        )
        .unwrap();
        ext4_of(&root, &img, 16);
        let all = list(&open(&img)).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].version, "6.1.0-28-amd64");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn reads_never_leave_the_disk_whatever_a_partition_table_claims() {
        let d = tmp("hostile-mbr");
        let mut disk = vec![0u8; 4096];
        for i in 0..4 {
            let e = &mut disk[446 + i * 16..462 + i * 16];
            e[4] = if i == 0 { 0xEE } else { 0x83 };
            e[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        }
        disk[510] = 0x55;
        disk[511] = 0xAA;
        // A GPT header whose table is past the end, with huge counts.
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        disk[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let img = d.join("disk.img");
        std::fs::write(&img, &disk).unwrap();
        assert_eq!(list(&open(&img)).err(), Some(DiskKernelError::NoKernels(1)));
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! Loading the guest kernel and initrd and writing what the boot protocols
//! expect: Linux's zero page (64-bit entry) or PVH's start info (32-bit entry),
//! identity page tables and a GDT.

use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use devices::virtio::GuestMemoryMmap;
use linux_loader::bootparam::{boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, ReadVolatile};

use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a bootable kernel (neither a bzImage nor an ELF vmlinux with a PVH entry)"
    )]
    NotAKernel { path: String },
    #[error("cannot load kernel {path}: {detail}")]
    LoadKernel { path: String, detail: String },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give the guest more memory")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("cannot write boot data into guest memory: {0}")]
    GuestMemory(String),
}

/// How the vCPU must enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode at `entry`, RSI = zero page.
    Linux64,
    /// 32-bit protected mode, paging off, EBX = start info.
    Pvh,
}

#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: GuestAddress,
    pub mode: EntryMode,
}

/// Where a kernel or an initrd comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Image {
    /// A file of the host, read at every boot (the kernel library).
    File(PathBuf),
    /// Read already: a kernel from the guest's own disk
    /// (`disk_kernels`), `label` naming it in messages.
    Bytes { label: String, data: Arc<[u8]> },
}

impl Image {
    /// The host file, for a library or `--kernel` image.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            Image::File(p) => Some(p),
            Image::Bytes { .. } => None,
        }
    }

    /// For messages: the path, or the label.
    pub fn label(&self) -> String {
        match self {
            Image::File(p) => p.display().to_string(),
            Image::Bytes { label, .. } => label.clone(),
        }
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::File(p) => write!(f, "File({})", p.display()),
            Image::Bytes { label, data } => write!(f, "Bytes({label}, {} bytes)", data.len()),
        }
    }
}

/// Everything needed to (re)boot: read from disk on every boot so that a
/// kernel switched in the library takes effect at the next reset.
pub struct BootSpec<'a> {
    pub kernel: &'a Image,
    pub initrd: Option<&'a Image>,
    pub cmdline: &'a str,
    pub mem_bytes: u64,
    pub rsdp: GuestAddress,
}

pub fn build_cmdline(s: &str) -> Result<Cmdline, BootError> {
    Cmdline::try_from(s, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

fn is_elf<F: Read + Seek>(f: &mut F) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0))?;
    let n = f.read(&mut magic)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Loads kernel, initrd and command line and writes the boot structures.
pub fn load(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let kpath = spec.kernel.label();
    let (loaded, elf) = match spec.kernel {
        Image::File(p) => {
            let mut f = File::open(p).map_err(|source| BootError::OpenKernel {
                path: kpath.clone(),
                source,
            })?;
            load_kernel(mem, &mut f, &kpath)?
        }
        Image::Bytes { data, .. } => load_kernel(mem, &mut Cursor::new(data.clone()), &kpath)?,
    };
    finish(mem, spec, loaded, elf, kpath)
}

/// The kernel into guest memory: an ELF with a PVH entry or a bzImage.
fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    kfile: &mut F,
    kpath: &str,
) -> Result<(linux_loader::loader::KernelLoaderResult, bool), BootError> {
    let elf = is_elf(kfile).map_err(|source| BootError::OpenKernel {
        path: kpath.to_string(),
        source,
    })?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded = if elf {
        Elf::load(mem, None, kfile, highmem)
    } else {
        BzImage::load(mem, None, kfile, highmem)
    }
    .map_err(|e| match e {
        linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )
        | linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        ) => BootError::NotAKernel {
            path: kpath.to_string(),
        },
        other => BootError::LoadKernel {
            path: kpath.to_string(),
            detail: other.to_string(),
        },
    })?;
    Ok((loaded, elf))
}

/// Command line, initrd and the boot protocol's structures.
fn finish(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    loaded: linux_loader::loader::KernelLoaderResult,
    elf: bool,
    kpath: String,
) -> Result<BootEntry, BootError> {
    let cmdline = build_cmdline(spec.cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    let initrd_limit = match &loaded.setup_header {
        Some(h) if h.initrd_addr_max != 0 => {
            (u64::from(h.initrd_addr_max) + 1).min(low_ram_end(spec.mem_bytes))
        }
        _ => low_ram_end(spec.mem_bytes),
    };
    let initrd = match spec.initrd {
        Some(Image::File(p)) => {
            let ipath = p.display().to_string();
            let f = File::open(p).map_err(|source| BootError::ReadInitrd {
                path: ipath.clone(),
                source,
            })?;
            let size = f
                .metadata()
                .map_err(|source| BootError::ReadInitrd {
                    path: ipath.clone(),
                    source,
                })?
                .len();
            Some(load_initrd(
                mem,
                f,
                size,
                &ipath,
                loaded.kernel_end,
                initrd_limit,
            )?)
        }
        Some(Image::Bytes { label, data }) => Some(load_initrd(
            mem,
            Cursor::new(data.clone()),
            data.len() as u64,
            label,
            loaded.kernel_end,
            initrd_limit,
        )?),
        None => None,
    };

    write_page_tables(mem)?;
    write_gdt(mem, if elf { &GDT32 } else { &GDT })?;

    if elf {
        let entry = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr,
            _ => return Err(BootError::NotAKernel { path: kpath }),
        };
        write_pvh_start_info(mem, spec, initrd)?;
        return Ok(BootEntry {
            entry,
            mode: EntryMode::Pvh,
        });
    }

    let header = loaded.setup_header.ok_or(BootError::NotAKernel {
        path: kpath.clone(),
    })?;
    write_zero_page(mem, spec, header, cmdline_len, initrd)?;
    // The 64-bit entry point sits 0x200 past the protected-mode code start.
    Ok(BootEntry {
        entry: loaded.kernel_load.unchecked_add(0x200),
        mode: EntryMode::Linux64,
    })
}

/// Places the initrd page-aligned at the top of usable low memory.
fn load_initrd<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    mut f: F,
    size: u64,
    ipath: &str,
    kernel_end: u64,
    limit: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let too_large = || BootError::InitrdTooLarge {
        path: ipath.to_string(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::ReadInitrd {
            path: ipath.to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((GuestAddress(addr), size))
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::GuestMemory(e.to_string())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    header: setup_header,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = spec.rsdp.raw_value();
    let map = e820_map(spec.mem_bytes);
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i].addr = e.addr;
        params.e820_table[i].size = e.size;
        params.e820_table[i].r#type = e.kind as u32;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(mem_err)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    initrd: Option<(GuestAddress, u64)>,
) -> Result<(), BootError> {
    let map: Vec<hvm_memmap_table_entry> = e820_map(spec.mem_bytes)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: spec.rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        let modlist_addr = PVH_MEMMAP_START + 0x400;
        info.modlist_paddr = modlist_addr;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: addr.raw_value(),
                size,
                ..Default::default()
            }],
            GuestAddress(modlist_addr),
        );
    }
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(mem_err)
}

/// Identity-maps the first 4 GiB with 2 MiB pages (the 64-bit entry needs
/// paging; Linux builds its own tables right away).
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_obj(PDPT_START | 0x3, GuestAddress(PML4_START))
        .map_err(mem_err)?;
    for pd in 0..4u64 {
        let pd_addr = PD_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_START + pd * 8))
            .map_err(mem_err)?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd_addr + i * 8))
                .map_err(mem_err)?;
        }
    }
    Ok(())
}

/// GDT entries: null, 64-bit code (0x08 unused), code 0x10, data 0x18, TSS 0x20.
pub const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code
    0x00af_9b00_0000_ffff, // 64-bit code (selector 0x10, what Linux expects)
    0x00cf_9300_0000_ffff, // data
    0x008f_8b00_0000_ffff, // TSS
];
/// 32-bit flat GDT for the PVH entry: code 0x10, data 0x18.
pub const GDT32: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), BootError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(mem_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(mib << 20)).unwrap()
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let mem = guest_mem(64);
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_START + 24)).unwrap();
        assert_eq!(pdpt3 & !0xfff, PD_START + 0x3000);
        let last: u64 = mem
            .read_obj(GuestAddress(PD_START + 0x3000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        assert_eq!(last & 0x83, 0x83, "present, writable, 2 MiB page");
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("not-a-kernel");
        std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
        let mem = guest_mem(64);
        let from_disk = Image::Bytes {
            label: "disk:6.1.0-28-amd64".into(),
            data: vec![0x42u8; 8192].into(),
        };
        for image in [Image::File(p), from_disk] {
            let spec = BootSpec {
                kernel: &image,
                initrd: None,
                cmdline: "console=ttyS0",
                mem_bytes: 64 << 20,
                rsdp: GuestAddress(ACPI_START),
            };
            let err = load(&mem, &spec).unwrap_err();
            assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
            assert!(err.to_string().contains("not a bootable kernel"));
            assert!(err.to_string().contains(&image.label()), "{err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The library's mini bzImage (built by `resources/build-kernels.sh
    /// mini`; CI builds it before the tests, VMM_REQUIRE_KERNELS=1).
    fn mini_bzimage() -> Option<PathBuf> {
        let p =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/kernels/mini/bzImage");
        if p.is_file() {
            return Some(p);
        }
        assert!(
            std::env::var("VMM_REQUIRE_KERNELS").as_deref() != Ok("1"),
            "{} missing: run resources/build-kernels.sh mini",
            p.display()
        );
        eprintln!("skipped: {} missing", p.display());
        None
    }

    #[test]
    fn a_kernel_and_initrd_read_from_the_guests_disk_load_as_from_files() {
        let Some(bz) = mini_bzimage() else { return };
        let dir = std::env::temp_dir().join(format!("vmm-boot-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let initrd = dir.join("initrd.img");
        std::fs::write(&initrd, vec![0x5au8; 300_000]).unwrap();
        let load_with = |kernel: Image, initrd: Image| {
            let mem = guest_mem(256);
            let spec = BootSpec {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "console=ttyS0",
                mem_bytes: 256 << 20,
                rsdp: GuestAddress(ACPI_START),
            };
            let entry = load(&mem, &spec).unwrap();
            let mut zero = vec![0u8; 4096];
            mem.read_slice(&mut zero, GuestAddress(ZERO_PAGE_START))
                .unwrap();
            let mut first = vec![0u8; 4096];
            mem.read_slice(&mut first, GuestAddress(HIMEM_START))
                .unwrap();
            (entry.entry, entry.mode, zero, first)
        };
        let files = load_with(Image::File(bz.clone()), Image::File(initrd.clone()));
        let bytes = load_with(
            Image::Bytes {
                label: "disk:mini".into(),
                data: std::fs::read(&bz).unwrap().into(),
            },
            Image::Bytes {
                label: "disk:mini initrd".into(),
                data: std::fs::read(&initrd).unwrap().into(),
            },
        );
        assert_eq!(files.0, bytes.0);
        assert_eq!(files.1, EntryMode::Linux64);
        assert_eq!(files.1, bytes.1);
        assert_eq!(
            files.2, bytes.2,
            "the zero page (initrd address and size included)"
        );
        assert_eq!(files.3, bytes.3, "the kernel's first page");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_initrd_larger_than_memory_is_refused() {
        let dir = std::env::temp_dir().join(format!("vmm-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("big.img");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(80 << 20).unwrap();
        let mem = guest_mem(64);
        let size = |f: &File| f.metadata().unwrap().len();
        let err = load_initrd(&mem, &f, size(&f), "big.img", 0x200_0000, 64 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        // Read from the guest's disk: the same check.
        let data = vec![0u8; 80 << 20];
        let err = load_initrd(
            &mem,
            Cursor::new(&data[..]),
            80 << 20,
            "disk",
            0x200_0000,
            64 << 20,
        );
        assert!(matches!(err, Err(BootError::InitrdTooLarge { .. })));
        f.set_len(1 << 20).unwrap();
        let (addr, size) =
            load_initrd(&mem, &f, size(&f), "big.img", 0x200_0000, 64 << 20).unwrap();
        assert_eq!(size, 1 << 20);
        assert_eq!(addr.raw_value() % 4096, 0);
        assert!(addr.raw_value() + size <= 64 << 20);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 10);
        assert!(build_cmdline(&long).is_err());
        assert!(build_cmdline("console=ttyS0 panic=1").is_ok());
    }
}

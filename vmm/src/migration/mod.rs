//! Live migration (issue 13, item 2): a running VM sent to a VMM started
//! with `--incoming HOST:PORT`, over TCP (the stream: [`wire`]).
//!
//! The source ([`source`], the operator's `migrate`, on a thread of its
//! own) copies all guest memory while the guest runs, then, pass after
//! pass, what the guest wrote meanwhile (KVM's dirty log for the vCPUs'
//! writes, vm-memory's bitmap for the VMM's own devices'; a network
//! interface on vhost-net is moved to the userspace datapath for the
//! migration, since the host kernel's writes are in neither). When little
//! is left, or the passes stop converging, the guest stops, the rest and
//! the machine's state (as a snapshot's) go over, and the target rebuilds
//! the machine and says so. Only then does the source let go of the
//! disks' image locks and tell the target to run the guest; the source's
//! guest is powered off and its VMM exits. Until that go-ahead the guest
//! can always run on at the source: any failure (the connection, the
//! target, a reset of the guest meanwhile) ends the migration there, and
//! the guest never noticed but for a pause.
//!
//! The target ([`target`]) listens before it confines itself, accepts one
//! connection at a time and checks its greeting, token and machine shape
//! before it takes any memory; a stray or hostile connection is refused
//! with one line and the target listens on.
//!
//! Trust: the token (`--incoming-token-file`, at least 16 characters) is
//! the only authentication and the stream is not encrypted: run
//! migrations over the hosts' own network (or a tunnel), never the
//! customers'. The disks are the hosts' shared storage: both VMMs open the
//! same image paths.

pub mod budget;
pub mod flow;
pub mod source;
pub mod target;
pub mod wire;

/// Guest memory is sent in 4 KiB pages (KVM's and vm-memory's dirty-page
/// granularity).
pub const PAGE: u64 = 4096;

/// Bitmaps of what was written (bit i of word i/64: page or chunk i), as
/// KVM's dirty log, vm-memory's and the disks' write logs give them.
pub mod bits {
    /// How many bits are set.
    pub fn count(maps: &[Vec<u64>]) -> u64 {
        maps.iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// ORs `from` into `into`, map by map.
    pub fn or_into(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
        for (d, p) in into.iter_mut().zip(from) {
            for (a, b) in d.iter_mut().zip(p) {
                *a |= b;
            }
        }
    }

    /// The runs of set bits among the first `n` of `words`, each at most
    /// `max` long: (first, length).
    pub fn runs(words: &[u64], n: u64, max: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let set = move |i: u64| {
            words
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        let max = max.max(1);
        let mut i = 0u64;
        std::iter::from_fn(move || {
            while i < n && !set(i) {
                i += 1;
            }
            if i >= n {
                return None;
            }
            let first = i;
            while i < n && set(i) && i - first < max {
                i += 1;
            }
            Some((first, i - first))
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn runs_are_split_at_clear_bits_at_the_limit_and_at_n() {
            let words = [0b1110_0111u64, 1 << 63, 1];
            let r: Vec<_> = runs(&words, 129, 2).collect();
            assert_eq!(r, vec![(0, 2), (2, 1), (5, 2), (7, 1), (127, 2)]);
            let r: Vec<_> = runs(&words, 128, 64).collect();
            assert_eq!(r, vec![(0, 3), (5, 3), (127, 1)]);
            assert_eq!(count(&[words.to_vec()]), 8);
            let mut into = vec![vec![1u64, 0]];
            or_into(&mut into, &[vec![2, 4]]);
            assert_eq!(into, vec![vec![3, 4]]);
        }
    }
}

/// Each memory region's offset in guest RAM laid out as one file (the
/// migration stream's and the snapshot's addressing): (start address,
/// length, file offset).
pub fn region_offsets(
    mem: &devices::virtio::GuestMemoryMmap,
) -> Vec<(vm_memory::GuestAddress, u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut off = 0u64;
    mem.iter()
        .map(|r| {
            let e = (r.start_addr(), r.len(), off);
            off += r.len();
            e
        })
        .collect()
}

//! What a live migration needs of a network interface: the datapath kept
//! in the VMM while memory is copied (vhost-net writes guest memory from
//! the host kernel, where no dirty-page log of ours sees it), and the
//! guest announced on its new host's network once it runs there.

use std::fs::File;
use std::io;

use super::{Net, VNET_HDR_LEN};

/// The announcement: a RARP request from the guest's MAC, as QEMU sends.
/// Switches and bridges learn from its source address where the guest is
/// now, so frames for it (its TCP connections') go there at once rather
/// than after their entries age out. The guest's addresses are not needed.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]); // broadcast
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    // The minimum Ethernet frame (60 bytes before its checksum).
    f.resize(VNET_HDR_LEN + 60, 0);
    f
}

impl Net {
    /// Takes the vhost-net instance away, so that the next activation uses
    /// the userspace datapath (quiesce and restore the device around this).
    pub fn take_vhost(&mut self) -> Vec<File> {
        std::mem::take(&mut self.vhost_dev)
    }

    /// Gives back what [`Net::take_vhost`] took (for the next activation).
    pub fn put_vhost(&mut self, devs: Vec<File>) {
        if !devs.is_empty() {
            self.vhost_dev = devs;
        }
    }

    /// Sends the guest's announcement on the TAP (its first queue: the
    /// frame leaves the host's side of the TAP whichever queue sends it).
    pub fn announce(&self) -> io::Result<()> {
        match self.taps.first() {
            Some(tap) => tap.write_frame(&rarp_frame(self.mac)).map(|_| ()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_a_broadcast_rarp_from_the_guests_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(e.len(), 60);
        assert_eq!(&e[..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert!(
            f[..VNET_HDR_LEN].iter().all(|&b| b == 0),
            "no offload asked"
        );
    }
}

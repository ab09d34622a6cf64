//! The guest's loopback interface, brought up at boot.
//!
//! The guest kernel starts with `lo` down and nothing in the initramfs runs `ip`, so until the
//! agent brings it up nothing in the guest reaches `127.0.0.1`: not the egress proxy the agent
//! serves there, not a workload's server behind a forwarded port. Up, it has `127.0.0.1/8` and
//! `::1` (the kernel gives loopback its addresses itself). It is the guest's only interface.

use std::io;

use rustix::ioctl::{ioctl, Opcode, Updater};
use rustix::net::{socket, AddressFamily, SocketType};

/// The interface's name.
const LOOPBACK: &[u8] = b"lo";
/// `SIOCGIFFLAGS`, `SIOCSIFFLAGS` (`linux/sockios.h`): read and set an interface's flags.
const GET_FLAGS: Opcode = 0x8913;
const SET_FLAGS: Opcode = 0x8914;
/// `IFF_UP` (`linux/if.h`).
const UP: i16 = 0x1;

/// `struct ifreq` (`linux/if.h`) as the flags requests use it: the name, then the union's
/// `short ifr_flags`, padded to the union's size on 64-bit (24 bytes).
#[repr(C)]
struct InterfaceFlags {
    name: [u8; 16],
    flags: i16,
    rest: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<InterfaceFlags>() == 40);

impl InterfaceFlags {
    fn named(name: &[u8]) -> Self {
        let mut request = Self {
            name: [0; 16],
            flags: 0,
            rest: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name);
        request
    }
}

/// Brings `lo` up (a no-op when it is up already).
pub fn bring_up() -> io::Result<()> {
    let socket = socket(AddressFamily::INET, SocketType::DGRAM, None)?;
    let mut request = InterfaceFlags::named(LOOPBACK);
    read_flags(&socket, &mut request)?;
    if request.flags & UP != 0 {
        return Ok(());
    }
    request.flags |= UP;
    // SAFETY: SIOCSIFFLAGS reads a `struct ifreq`, which `InterfaceFlags` lays out (its name
    // NUL-terminated, its size the kernel's), and writes nothing back.
    #[allow(unsafe_code)]
    unsafe {
        ioctl(&socket, Updater::<SET_FLAGS, _>::new(&mut request))?;
    }
    Ok(())
}

/// Reads the flags of the interface `request` names into it.
fn read_flags(socket: &impl std::os::fd::AsFd, request: &mut InterfaceFlags) -> io::Result<()> {
    // SAFETY: SIOCGIFFLAGS reads a `struct ifreq` naming the interface and writes its flags
    // into the same struct; `InterfaceFlags` has the kernel's layout and size, so the kernel
    // reads and writes only within it.
    #[allow(unsafe_code)]
    unsafe {
        ioctl(socket, Updater::<GET_FLAGS, _>::new(request))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_request_reads_the_hosts_loopback_as_up() {
        let socket = socket(AddressFamily::INET, SocketType::DGRAM, None).unwrap();
        let mut request = InterfaceFlags::named(LOOPBACK);
        read_flags(&socket, &mut request).unwrap();
        assert_ne!(request.flags & UP, 0, "the host's lo is up");
        // Bringing up what is up changes nothing and needs no privilege.
        bring_up().unwrap();
    }
}

//! A dm-verity device over the root filesystem image, and dm-crypt devices over encrypted
//! volumes, made with device-mapper ioctls.
//!
//! No `dmsetup` in the guest: four ioctls on `/dev/mapper/control` do what `veritysetup open`
//! (or `cryptsetup open --type plain`) does. `DM_VERSION` checks the interface, `DM_DEV_CREATE` makes an empty device,
//! `DM_TABLE_LOAD` gives it one read-only `verity` target over the whole image, and
//! `DM_DEV_SUSPEND` without the suspend flag makes that table live. The structures follow the
//! kernel's `include/uapi/linux/dm-ioctl.h` (interface version 4), with their sizes checked at
//! compile time.
//!
//! From then on every read from the device is checked against the hash tree up to the signed
//! root hash; a block that does not match fails with EIO (dm-verity's default mode, which
//! neither restarts nor panics the guest, so the agent can report it).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::path::PathBuf;

use rustix::fs::{FileType, Mode};
use rustix::ioctl::{opcode, Opcode, Updater};

use super::BootError;
use mvm_protocol::cmdline::VerityCmdline;
use zeroize::{Zeroize, Zeroizing};

/// The device-mapper control node (devtmpfs creates it when `dm_mod` loads).
const CONTROL: &str = "/dev/mapper/control";
/// The ioctl interface version spoken here; the kernel accepts any minor up to its own.
const DM_VERSION_MAJOR: u32 = 4;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const DM_MAX_TYPE_NAME: usize = 16;
/// The table is read-only: dm-verity refuses to be opened writable.
const DM_READONLY_FLAG: u32 = 1 << 0;
/// The ioctl group of device-mapper.
const DM_IOCTL: u8 = 0xfd;
const DM_VERSION: Opcode = opcode::read_write::<DmIoctl>(DM_IOCTL, 0);
const DM_DEV_CREATE: Opcode = opcode::read_write::<DmIoctl>(DM_IOCTL, 3);
const DM_DEV_SUSPEND: Opcode = opcode::read_write::<DmIoctl>(DM_IOCTL, 6);
const DM_TABLE_LOAD: Opcode = opcode::read_write::<DmIoctl>(DM_IOCTL, 9);
const DM_TABLE_STATUS: Opcode = opcode::read_write::<DmIoctl>(DM_IOCTL, 12);
/// The kernel could not fit the whole answer in the buffer it was given.
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
/// Room for the verity target's parameters: the longest possible table (two device paths,
/// 20-digit numbers, a 64-digit root hash and a 512-digit salt) is under 700 bytes.
const PARAMS_LEN: usize = 1024;

/// `struct dm_ioctl`: the header of every device-mapper ioctl, in and out.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmIoctl {
    version: [u32; 3],
    /// Bytes of the whole argument, this header included.
    data_size: u32,
    /// Where the payload (target specs) begins, from the start of the header.
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    /// The device number, in the kernel's `huge_encode_dev` form.
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}
const _: () = assert!(size_of::<DmIoctl>() == 312);

/// `struct dm_target_spec`: one target of a table; its parameter string follows it.
#[repr(C)]
#[derive(Clone, Copy)]
struct DmTargetSpec {
    sector_start: u64,
    /// Length of the target in 512-byte sectors.
    length: u64,
    status: i32,
    /// Offset of the next spec from the start of this one.
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}
const _: () = assert!(size_of::<DmTargetSpec>() == 40);

/// The argument of `DM_TABLE_LOAD` with one target: header, spec, NUL-terminated parameters.
#[repr(C)]
struct TableLoad {
    header: DmIoctl,
    spec: DmTargetSpec,
    params: [u8; PARAMS_LEN],
}
const _: () = assert!(size_of::<TableLoad>().is_multiple_of(8));

/// An argument the device-mapper ioctls accept: a `dm_ioctl` header first, whose `data_size`
/// says how many bytes of the value the kernel may read and write.
trait DmArgument {
    fn header(&self) -> &DmIoctl;
}

impl DmArgument for DmIoctl {
    fn header(&self) -> &DmIoctl {
        self
    }
}

impl DmArgument for TableLoad {
    fn header(&self) -> &DmIoctl {
        &self.header
    }
}

/// The argument of `DM_TABLE_STATUS`: a header, then room for the kernel to write one target
/// spec and its status string.
#[repr(C)]
struct TableStatus {
    header: DmIoctl,
    data: [u8; PARAMS_LEN],
}
const _: () = assert!(size_of::<TableStatus>().is_multiple_of(8));

impl DmArgument for TableStatus {
    fn header(&self) -> &DmIoctl {
        &self.header
    }
}

impl TableStatus {
    /// The status string of the first target, as the kernel wrote it: the spec begins at
    /// `data_start` from the start of the header, its NUL-terminated string right after it.
    /// Every offset comes from the kernel and is checked against the buffer.
    fn first_target_status(&self) -> Option<&[u8]> {
        if self.header.target_count == 0 || self.header.flags & DM_BUFFER_FULL_FLAG != 0 {
            return None;
        }
        let start = (self.header.data_start as usize).checked_sub(size_of::<DmIoctl>())?;
        let status = self.data.get(start + size_of::<DmTargetSpec>()..)?;
        let end = status.iter().position(|b| *b == 0)?;
        Some(&status[..end])
    }
}

impl DmIoctl {
    /// A header for the device `name`, covering an argument of `T`'s size.
    fn new<T>(name: &str) -> Self {
        let mut header = Self {
            version: [DM_VERSION_MAJOR, 0, 0],
            data_size: size_of::<T>() as u32,
            data_start: size_of::<Self>() as u32,
            target_count: 0,
            open_count: 0,
            flags: 0,
            event_nr: 0,
            padding: 0,
            dev: 0,
            name: [0; DM_NAME_LEN],
            uuid: [0; DM_UUID_LEN],
            data: [0; 7],
        };
        copy_nul_terminated(&mut header.name, name.as_bytes());
        header
    }

    /// The device number as `(major, minor)`, undoing the kernel's `huge_encode_dev`.
    fn major_minor(&self) -> (u32, u32) {
        let dev = self.dev;
        let major = (dev >> 8) & 0xfff;
        let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
        (major as u32, minor as u32)
    }
}

impl TableLoad {
    /// One target of `target_type` over `sectors` sectors, with `params`.
    fn one(name: &str, target_type: &[u8], sectors: u64, params: &[u8], read_only: bool) -> Self {
        let mut header = DmIoctl::new::<Self>(name);
        header.target_count = 1;
        if read_only {
            header.flags = DM_READONLY_FLAG;
        }
        let mut spec = DmTargetSpec {
            sector_start: 0,
            length: sectors,
            status: 0,
            next: (size_of::<DmTargetSpec>() + PARAMS_LEN) as u32,
            target_type: [0; DM_MAX_TYPE_NAME],
        };
        copy_nul_terminated(&mut spec.target_type, target_type);
        let mut table = Self {
            header,
            spec,
            params: [0; PARAMS_LEN],
        };
        copy_nul_terminated(&mut table.params, params);
        table
    }

    /// One read-only `verity` target over the whole image.
    fn verity(name: &str, verity: &VerityCmdline, data_device: &str, hash_device: &str) -> Self {
        let params = verity.table(data_device, hash_device);
        Self::one(
            name,
            b"verity",
            verity.data_sectors(),
            params.as_bytes(),
            true,
        )
    }

    /// One writable `crypt` target over the whole of `device` (`sectors` long):
    /// `aes-xts-plain64` under the hex `key`, the tweak counted from sector 0. Writable even
    /// under a read-only mount, so that ext4 can replay a journal the last VM left.
    fn crypt(name: &str, device: &str, sectors: u64, key: &str) -> Self {
        let params = Zeroizing::new(format!("aes-xts-plain64 {key} 0 {device} 0"));
        Self::one(name, b"crypt", sectors, params.as_bytes(), false)
    }
}

impl Drop for TableLoad {
    /// A crypt table's parameters hold its key: not left in freed memory.
    fn drop(&mut self) {
        self.params.zeroize();
    }
}

/// Copies `from` into `to`, truncated so that at least one NUL byte ends it. Names and
/// parameters here are built by this module and fit; truncation would make the kernel refuse
/// the table rather than read past it.
fn copy_nul_terminated(to: &mut [u8], from: &[u8]) {
    let n = from.len().min(to.len() - 1);
    to[..n].copy_from_slice(&from[..n]);
    to[n..].fill(0);
}

/// Issues the device-mapper ioctl `OPCODE` with `arg`.
fn dm_ioctl<const OPCODE: Opcode, T: DmArgument>(
    control: &File,
    arg: &mut T,
    step: &'static str,
) -> Result<(), BootError> {
    // The kernel reads and writes back `data_size` bytes from the start of the argument.
    if arg.header().data_size as usize != size_of::<T>() {
        return Err(BootError::DeviceMapper {
            step,
            source: io::Error::other("argument size and data_size disagree"),
        });
    }
    // SAFETY: every `DmArgument` is a `#[repr(C)]` value that begins with a `struct dm_ioctl`
    // whose `data_size` is the size of the whole value (checked just above), which is what
    // the device-mapper ioctls (`_IOWR(0xfd, n, struct dm_ioctl)`) expect; the kernel reads
    // and writes only within those bytes, through a pointer that `Updater` borrows mutably
    // for the duration of the call, and every bit pattern is valid for these integer fields.
    let result = unsafe { rustix::ioctl::ioctl(control, Updater::<OPCODE, T>::new(arg)) };
    result.map_err(|e| BootError::DeviceMapper {
        step,
        source: e.into(),
    })
}

/// Creates the dm-verity device `name` over `data_device` with the hash tree on `hash_device`
/// and returns the path of a block device node for it.
pub fn open_verity(
    name: &str,
    data_device: &str,
    hash_device: &str,
    verity: &VerityCmdline,
) -> Result<PathBuf, BootError> {
    let table = Box::new(TableLoad::verity(name, verity, data_device, hash_device));
    create(name, table, 0o400)
}

/// Creates the dm-crypt device `name` over `device` (`sectors` 512-byte sectors) under the
/// 64-byte `key` (hex) and returns the path of a block device node for it.
pub fn open_crypt(name: &str, device: &str, sectors: u64, key: &str) -> Result<PathBuf, BootError> {
    let table = Box::new(TableLoad::crypt(name, device, sectors, key));
    create(name, table, 0o600)
}

/// Creates the device `name` with the one-target `table` and makes its node, of `mode`.
fn create(name: &str, mut table: Box<TableLoad>, mode: u32) -> Result<PathBuf, BootError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(|source| BootError::DeviceMapper {
            step: "open /dev/mapper/control",
            source,
        })?;

    let mut version = DmIoctl::new::<DmIoctl>("");
    dm_ioctl::<DM_VERSION, _>(&control, &mut version, "DM_VERSION")?;
    if version.version[0] != DM_VERSION_MAJOR {
        return Err(BootError::DeviceMapper {
            step: "DM_VERSION",
            source: io::Error::other(format!(
                "kernel speaks interface {}, not {DM_VERSION_MAJOR}",
                version.version[0]
            )),
        });
    }

    let mut create = DmIoctl::new::<DmIoctl>(name);
    dm_ioctl::<DM_DEV_CREATE, _>(&control, &mut create, "DM_DEV_CREATE")?;
    let (major, minor) = create.major_minor();

    dm_ioctl::<DM_TABLE_LOAD, _>(&control, &mut *table, "DM_TABLE_LOAD")?;
    drop(table);

    // Resuming (no DM_SUSPEND_FLAG) swaps the loaded table in and makes the device live.
    let mut resume = DmIoctl::new::<DmIoctl>(name);
    dm_ioctl::<DM_DEV_SUSPEND, _>(&control, &mut resume, "DM_DEV_SUSPEND (resume)")?;

    // A node of our own, from the number device-mapper returned, rather than guessing which
    // `/dev/dm-N` devtmpfs made.
    let node = PathBuf::from(format!("/dev/mapper/{name}"));
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &node,
        FileType::BlockDevice,
        Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
    .map_err(|e| BootError::DeviceMapper {
        step: "mknod",
        source: e.into(),
    })?;
    Ok(node)
}

/// Whether dm-verity has found a corrupted block on the device `name` since it was opened:
/// its status line is `V` while every block read verified and `C` from the first that did not.
pub fn verity_corrupted(name: &str) -> io::Result<bool> {
    let control = OpenOptions::new().read(true).write(true).open(CONTROL)?;
    let mut status = Box::new(TableStatus {
        header: DmIoctl::new::<TableStatus>(name),
        data: [0; PARAMS_LEN],
    });
    dm_ioctl::<DM_TABLE_STATUS, _>(&control, &mut *status, "DM_TABLE_STATUS")
        .map_err(|e| io::Error::other(e.to_string()))?;
    match status.first_target_status() {
        Some(b"V") => Ok(false),
        Some(b"C") => Ok(true),
        other => Err(io::Error::other(format!(
            "unexpected verity status {:?}",
            other.map(String::from_utf8_lossy)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layouts_match_dm_ioctl_h() {
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
        assert_eq!(offset_of!(TableLoad, spec), 312);
        // _IOWR(0xfd, 9, struct dm_ioctl), as the kernel headers spell DM_TABLE_LOAD.
        assert_eq!(DM_TABLE_LOAD, 0xc138_fd09);
    }

    #[test]
    fn a_verity_table_load_is_read_only_and_complete() {
        let v = mvm_protocol::cmdline::VerityCmdline::parse(&format!(
            "mvm.root_hash={} mvm.salt=ab mvm.data_blocks=10 mvm.hash_offset=0 mvm.block_size=4096",
            "0".repeat(64)
        ))
        .unwrap();
        let load = TableLoad::verity("mvm-root", &v, "/dev/vda", "/dev/vdb");
        assert_eq!(load.header.data_size as usize, size_of::<TableLoad>());
        assert_eq!(load.header.data_start, 312);
        assert_eq!(load.header.target_count, 1);
        assert_eq!(load.header.flags, DM_READONLY_FLAG);
        assert_eq!(&load.header.name[..9], b"mvm-root\0");
        assert_eq!(load.spec.length, 80);
        assert_eq!(&load.spec.target_type[..7], b"verity\0");
        let params = &load.params[..load.params.iter().position(|b| *b == 0).unwrap()];
        assert_eq!(
            params,
            format!(
                "1 /dev/vda /dev/vdb 4096 4096 10 1 sha256 {} ab",
                "0".repeat(64)
            )
            .as_bytes()
        );
    }

    #[test]
    fn a_crypt_table_load_names_the_cipher_key_and_device() {
        let key = "ab".repeat(64);
        let load = TableLoad::crypt("mvm-vol0", "/dev/vdc", 131072, &key);
        assert_eq!(load.header.flags, 0);
        assert_eq!(load.spec.length, 131072);
        assert_eq!(&load.spec.target_type[..6], b"crypt\0");
        let params = &load.params[..load.params.iter().position(|b| *b == 0).unwrap()];
        assert_eq!(
            params,
            format!("aes-xts-plain64 {key} 0 /dev/vdc 0").as_bytes()
        );
    }

    #[test]
    fn a_status_answer_is_read_within_its_buffer() {
        let mut status = TableStatus {
            header: DmIoctl::new::<TableStatus>("mvm-root"),
            data: [0; PARAMS_LEN],
        };
        assert_eq!(status.first_target_status(), None, "no target yet");
        status.header.target_count = 1;
        status.header.data_start = 312;
        status.data[40] = b'C';
        assert_eq!(status.first_target_status(), Some(&b"C"[..]));
        for hostile_start in [0, 311, 312 + PARAMS_LEN as u32, u32::MAX] {
            status.header.data_start = hostile_start;
            assert_eq!(status.first_target_status(), None, "{hostile_start}");
        }
        status.header.data_start = 312;
        status.data.fill(b'V');
        assert_eq!(status.first_target_status(), None, "no terminating NUL");
        status.data[41] = 0;
        status.header.flags = DM_BUFFER_FULL_FLAG;
        assert_eq!(status.first_target_status(), None, "truncated answer");
        // _IOWR(0xfd, 12, struct dm_ioctl)
        assert_eq!(DM_TABLE_STATUS, 0xc138_fd0c);
    }

    #[test]
    fn device_numbers_decode_like_huge_encode_dev() {
        let mut header = DmIoctl::new::<DmIoctl>("x");
        header.dev = (253 << 8) | 0x12 | (0x345 << 12 << 8);
        assert_eq!(header.major_minor(), (253, 0x34512));
    }
}

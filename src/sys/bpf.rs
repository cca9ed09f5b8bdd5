//! The few `bpf(2)` commands kernel dispatch needs: make a map, set and
//! delete its entries, load a program, and attach it to a reuseport group.
//! No libbpf and no object file: a program is an array of instructions
//! (`dispatch::kernel::program`), and a map is an fd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::proto::scm::cvt;

const MAP_CREATE: libc::c_int = 0;
const MAP_UPDATE_ELEM: libc::c_int = 2;
const MAP_DELETE_ELEM: libc::c_int = 3;
const PROG_LOAD: libc::c_int = 5;

/// `BPF_MAP_TYPE_ARRAY`: fixed-size values by index.
pub const MAP_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY`: listening sockets by index.
pub const MAP_REUSEPORT_SOCKARRAY: u32 = 20;
/// `BPF_PROG_TYPE_SK_REUSEPORT`.
const PROG_SK_REUSEPORT: u32 = 21;
/// `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`: the program also chooses where a
/// closing listener's queued connections go (instead of their reset).
const SELECT_OR_MIGRATE: u32 = 40;
/// `SO_ATTACH_REUSEPORT_EBPF`.
const ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// One instruction, as the kernel reads it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    /// Destination register in the low nibble, source in the high.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// `union bpf_attr`, as bytes: every command reads its own fields from the
/// front of it, and the rest must be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }

    fn u32(mut self, offset: usize, v: u32) -> Attr {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u64(mut self, offset: usize, v: u64) -> Attr {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_int, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable 128-byte buffer holding a valid
    // `bpf_attr` for `cmd` (the kernel reads at most `size` bytes of it);
    // every pointer stored in it points at memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    cvt(r)
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("bpf returned no fd"))?;
    // SAFETY: the kernel just returned this fd (CLOEXEC) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A map of `entries` values of `value_size` bytes, keyed by a `u32` index.
pub fn map_create(kind: u32, value_size: u32, entries: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new()
        .u32(0, kind)
        .u32(4, 4)
        .u32(8, value_size)
        .u32(12, entries);
    owned(bpf(MAP_CREATE, &mut attr)?)
}

/// `BPF_F_MMAPABLE`: an array map whose values lb may map into its memory.
const F_MMAPABLE: u32 = 1 << 10;

/// An array map of `entries` values of `value_size` bytes (at most 8),
/// mapped into lb's memory: lb writes its values with plain stores, no
/// system call (Linux 5.5 or later).
pub fn mapped_array(value_size: u32, entries: u32) -> io::Result<(OwnedFd, Mapped)> {
    let mut attr = Attr::new()
        .u32(0, MAP_ARRAY)
        .u32(4, 4)
        .u32(8, value_size)
        .u32(12, entries)
        .u32(16, F_MMAPABLE);
    let fd = owned(bpf(MAP_CREATE, &mut attr)?)?;
    // The kernel keeps each value on an 8-byte boundary.
    let elem = (value_size as usize).div_ceil(8) * 8;
    let len = (elem * entries as usize).max(1);
    // SAFETY: a shared read-write mapping of the map's values, which the
    // kernel sized for `entries` values of `elem` bytes; nothing else in lb
    // maps them, and `Mapped` unmaps exactly this range once.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok((
        fd,
        Mapped {
            ptr: ptr.cast(),
            len,
            elem,
        },
    ))
}

/// The values of a [`mapped_array`], written while a program reads them.
#[derive(Debug)]
pub struct Mapped {
    ptr: *mut u8,
    len: usize,
    elem: usize,
}

// SAFETY: the mapping is plain shared memory, written only through atomic
// stores; the dispatch thread that owns it may be another than its maker's.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Values the mapping holds.
    pub fn len(&self) -> usize {
        self.len / self.elem
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `map[index] = value` for a 4-byte value (release: a program that
    /// sees this store sees the ones before it).
    pub fn store_u32(&self, index: usize, value: u32) -> io::Result<()> {
        if index >= self.len() {
            return Err(io::Error::other(format!("index {index} beyond the map")));
        }
        // SAFETY: in bounds (checked), 8-byte aligned (a page-aligned
        // mapping, `elem` a multiple of 8), and only ever accessed
        // atomically by lb; the kernel's readers are BPF loads.
        let cell = unsafe { &*self.ptr.add(index * self.elem).cast::<AtomicU32>() };
        cell.store(value, Ordering::Release);
        Ok(())
    }

    /// `map[index] = value` for an 8-byte value.
    pub fn store_u64(&self, index: usize, value: u64) -> io::Result<()> {
        if index >= self.len() {
            return Err(io::Error::other(format!("index {index} beyond the map")));
        }
        // SAFETY: as in `store_u32`, for an 8-byte value at an 8-byte boundary.
        let cell = unsafe { &*self.ptr.add(index * self.elem).cast::<AtomicU64>() };
        cell.store(value, Ordering::Release);
        Ok(())
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: exactly the range `mapped_array` mapped, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Sets `map[key] = value`.
pub fn map_set(map: BorrowedFd<'_>, key: u32, value: &[u8]) -> io::Result<()> {
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, value.as_ptr() as u64);
    bpf(MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Removes `map[key]` (a sockarray's socket; arrays cannot delete).
pub fn map_delete(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    let mut attr = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64);
    match bpf(MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// Loads an `SK_REUSEPORT` program that may also migrate. On a refusal the
/// error carries the verifier's last line: the load is tried without a
/// log first (a log that does not fit fails a good program with `ENOSPC`
/// on kernels before 6.4), and again with one only to say why.
pub fn load_reuseport_program(insns: &[Insn]) -> io::Result<OwnedFd> {
    let license = b"GPL\0";
    let attr = || {
        Attr::new()
            .u32(0, PROG_SK_REUSEPORT)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(68, SELECT_OR_MIGRATE)
    };
    if let Ok(fd) = bpf(PROG_LOAD, &mut attr()) {
        return owned(fd);
    }
    let mut log = vec![0u8; 64 * 1024];
    let mut with_log = attr()
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    match bpf(PROG_LOAD, &mut with_log) {
        Ok(fd) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]);
            match text.lines().rev().find(|l| !l.trim().is_empty()) {
                Some(last) => Err(io::Error::new(e.kind(), format!("{e} (verifier: {last})"))),
                None => Err(e),
            }
        }
    }
}

/// Attaches `program` to the reuseport group `socket` is in.
pub fn attach_reuseport_program(socket: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: the option value is one live c_int, its size given; `socket`
    // is a valid fd for the call.
    cvt(unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            ATTACH_REUSEPORT_EBPF,
            (&fd as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

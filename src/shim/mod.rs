//! The accept shim (`lbshim.c`), as the master handles it: the shared
//! object built by `build.rs` and embedded here, the in-memory file workers
//! load it from (`LD_PRELOAD=/proc/self/fd/N`), and the check that refuses
//! binaries it cannot work in (static, Go) before they are started.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

/// The shim, built from `src/shim/lbshim.c`.
pub const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/liblbshim.so"));

/// Environment a shim-mode worker gets besides lb's own `LB_FD`.
pub mod env {
    /// The TCP port whose `bind`/`listen` the shim takes over.
    pub const PORT: &str = "LB_SHIM_PORT";
    /// The fd of the in-memory shim (closed on exec once claimed).
    pub const FD: &str = "LB_SHIM_FD";
    /// The signal DRAIN becomes (the pool's `stop_signal`, a number).
    pub const STOP_SIGNAL: &str = "LB_STOP_SIGNAL";
    pub const PRELOAD: &str = "LD_PRELOAD";
}

/// The shim in a sealed in-memory file; workers inherit its fd.
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    pub fn create() -> io::Result<Memfd> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create(
            c"lb-accept-shim.so",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(LIBRARY)?;
        // Read-only from now on: no worker can change what the next one loads.
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_WRITE
                    | nix::fcntl::SealFlag::F_SEAL_GROW
                    | nix::fcntl::SealFlag::F_SEAL_SHRINK
                    | nix::fcntl::SealFlag::F_SEAL_SEAL,
            ),
        )?;
        Ok(Memfd {
            fd: OwnedFd::from(file),
        })
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `LD_PRELOAD` for a worker that inherits this fd at the same number,
    /// in front of any preload the worker already has.
    pub fn preload(&self, theirs: Option<&str>) -> String {
        let ours = format!("/proc/self/fd/{}", self.raw());
        match theirs.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => format!("{ours} {t}"),
            None => ours,
        }
    }
}

/// Why `program` cannot run with the shim, if it cannot: a statically
/// linked binary ignores `LD_PRELOAD`, and Go makes raw syscalls. Scripts
/// (`#!`) and anything unreadable pass: their interpreter is checked by use.
pub fn unsupported(program: &Path) -> Option<&'static str> {
    let bytes = std::fs::read(program).ok()?;
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    if memchr_find(&bytes, b"\xff Go buildinf:") {
        return Some("is a Go program, which makes raw syscalls the shim cannot see");
    }
    match has_interpreter(&bytes) {
        Some(false) => Some("is statically linked, so it ignores LD_PRELOAD"),
        _ => None,
    }
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether an ELF file has a `PT_INTERP` program header (is dynamically
/// linked); `None` when the headers cannot be read.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let class64 = *elf.get(4)? == 2;
    let little = *elf.get(5)? == 1;
    let u16_at = |o: usize| -> Option<u64> {
        let b: [u8; 2] = elf.get(o..o + 2)?.try_into().ok()?;
        Some(u64::from(if little {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }))
    };
    let u32_at = |o: usize| -> Option<u64> {
        let b: [u8; 4] = elf.get(o..o + 4)?.try_into().ok()?;
        Some(u64::from(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }))
    };
    let u64_at = |o: usize| -> Option<u64> {
        let b: [u8; 8] = elf.get(o..o + 8)?.try_into().ok()?;
        Some(if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    };
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?)
    } else {
        (u32_at(0x1c)?, u16_at(0x2a)?, u16_at(0x2c)?)
    };
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).ok()?;
        if u32_at(at)? == u64::from(PT_INTERP) {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_an_elf_shared_object() {
        assert!(LIBRARY.starts_with(b"\x7fELF"));
        assert!(memchr_find(LIBRARY, b"LB_SHIM_PORT"));
    }

    #[test]
    fn dynamic_binaries_pass_and_scripts_are_not_judged() {
        assert_eq!(unsupported(Path::new("/bin/sh")), None);
        assert_eq!(
            has_interpreter(&std::fs::read("/bin/sh").unwrap()),
            Some(true)
        );
        let dir = std::env::temp_dir().join(format!("lb-shim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert_eq!(unsupported(&script), None);
        // A static binary, when the toolchain can make one.
        let c = dir.join("t.c");
        std::fs::write(&c, "int main(void){return 0;}\n").unwrap();
        let bin = dir.join("t");
        let built = std::process::Command::new("cc")
            .arg("-static")
            .arg("-o")
            .arg(&bin)
            .arg(&c)
            .status()
            .is_ok_and(|s| s.success());
        if built {
            assert_eq!(
                unsupported(&bin),
                Some("is statically linked, so it ignores LD_PRELOAD")
            );
        } else {
            eprintln!("no static libc here: the static-binary case is not exercised");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn memfd_holds_the_library() {
        let m = Memfd::create().unwrap();
        let read = std::fs::read(format!("/proc/self/fd/{}", m.raw())).unwrap();
        assert_eq!(read, LIBRARY);
        assert_eq!(
            m.preload(Some("libx.so")),
            format!("/proc/self/fd/{} libx.so", m.raw())
        );
    }
}

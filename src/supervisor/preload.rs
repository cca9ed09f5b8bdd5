//! The close-report preload Node workers load (`--require`), written
//! where no other local user can swap it.

use std::io;
use std::path::{Path, PathBuf};

use crate::proto::node;

/// The close-report preload for Node workers, written once into a
/// directory only the master can write to, and removed with it at exit.
///
/// The directory is `lb-<pid>-node-<16 random hex digits>` (see
/// `private_dir`) in `$XDG_RUNTIME_DIR` if that is a directory, else in the
/// temp directory: another local user can neither guess its name nor make
/// lb use, follow or remove anything of theirs.
pub struct Preload {
    dir: PathBuf,
    pub file: PathBuf,
    /// Readable by workers of another user (see [`Preload::write`]).
    pub shared: bool,
}

/// The preload's name in its directory.
const PRELOAD_FILE: &str = "close-report.js";
/// Random names tried before giving up (each is taken only by chance, or
/// by someone who can read the master's memory).
const NAME_TRIES: usize = 8;

impl Preload {
    /// `shared`: for workers that run as another user (a pool's `user`),
    /// who must be able to read it: then it goes in the temp directory
    /// (`$XDG_RUNTIME_DIR` is the master's user's alone), its directory
    /// 0711 and the file 0644, still writable by the master alone.
    pub fn write(shared: bool) -> io::Result<Preload> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir() && !shared)
            .unwrap_or_else(std::env::temp_dir);
        let prefix = format!("lb-{}-node-", std::process::id());
        let dir = private_dir(&base, &prefix, random_name)?;
        // From here on, dropping it removes the directory.
        let preload = Preload {
            file: dir.join(PRELOAD_FILE),
            dir,
            shared,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if shared { 0o644 } else { 0o600 })
            .open(&preload.file)?;
        io::Write::write_all(&mut file, node::PRELOAD.as_bytes())?;
        if shared {
            // Set, not asked of create: the umask would take bits off.
            file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
            std::fs::set_permissions(&preload.dir, std::fs::Permissions::from_mode(0o711))?;
        }
        Ok(preload)
    }
}

impl Drop for Preload {
    fn drop(&mut self) {
        // Only what was made: the file, then the (then empty) directory.
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// 16 hex digits nobody else can predict: SipHash under the keys std seeds
/// from the system's secure random source (getrandom(2)), fresh for each
/// `RandomState`.
fn random_name() -> String {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    format!("{:016x}", state.hash_one(std::time::SystemTime::now()))
}

/// Makes a new directory `<base>/<prefix><next_name()>` of this uid, mode
/// 0700, the way mkdtemp(3) does: mkdir(2) fails on anything already at
/// the name (a symlink included, which it never follows), so nothing that
/// was there is used, followed or removed; a taken name is retried with
/// the next, a few times. The base must be one nobody else can rename
/// entries in (not writable by group or others unless sticky, like /tmp,
/// and of this uid or root's), and what was made is checked to be a real
/// directory of this uid.
fn private_dir(
    base: &Path,
    prefix: &str,
    mut next_name: impl FnMut() -> String,
) -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    const FIX: &str = "point $XDG_RUNTIME_DIR (or, if unset, $TMPDIR) at a directory of yours";
    let uid = nix::unistd::geteuid().as_raw();
    let b = base.display();
    let meta =
        std::fs::metadata(base).map_err(|e| io::Error::new(e.kind(), format!("{b}: {e}")))?;
    let mode = meta.mode();
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{b} is not a directory")));
    }
    if meta.uid() != uid && meta.uid() != 0 {
        return Err(io::Error::other(format!(
            "{b} belongs to uid {}, who could swap what lb puts there; {FIX}",
            meta.uid()
        )));
    }
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Err(io::Error::other(format!(
            "{b} is writable by others and not sticky (mode {:o}), so anyone could swap what lb \
             puts there; {FIX}",
            mode & 0o7777
        )));
    }
    for _ in 0..NAME_TRIES {
        let dir = base.join(format!("{prefix}{}", next_name()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot make a directory in {b}: {e}"),
                ));
            }
        }
        // Made by this call; still what it made (no one may rename in
        // `base`, but say so rather than trust it)?
        let made = std::fs::symlink_metadata(&dir)?;
        if !made.is_dir() || made.uid() != uid {
            return Err(io::Error::other(format!(
                "{} was replaced right after lb made it; someone can rename entries in {b}",
                dir.display()
            )));
        }
        // 0700 whatever the umask took off.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        return Ok(dir);
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{NAME_TRIES} random names in {b} were all taken"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-spawn-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn a_private_dir_is_new_0700_ours_and_unpredictable() {
        let base = scratch("private");
        let a = private_dir(&base, "lb-1-node-", random_name).unwrap();
        let b = private_dir(&base, "lb-1-node-", random_name).unwrap();
        assert_ne!(a, b);
        for d in [&a, &b] {
            assert_eq!(d.parent(), Some(base.as_path()));
            let name = d.file_name().unwrap().to_str().unwrap();
            let suffix = name.strip_prefix("lb-1-node-").unwrap();
            assert_eq!(suffix.len(), 16, "{name}");
            assert!(suffix.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
            let meta = std::fs::symlink_metadata(d).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
            assert_eq!(meta.mode() & 0o7777, 0o700);
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_taken_name_is_skipped_and_left_as_it_was() {
        let base = scratch("taken");
        let victim = base.join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("marker"), "keep").unwrap();
        std::os::unix::fs::symlink(&victim, base.join("p-link")).unwrap();
        std::os::unix::fs::symlink(base.join("nowhere"), base.join("p-dangling")).unwrap();
        std::fs::create_dir(base.join("p-dir")).unwrap();
        std::fs::write(base.join("p-dir/marker"), "keep").unwrap();
        std::fs::write(base.join("p-file"), "keep").unwrap();
        let mut names = ["link", "dangling", "dir", "file", "free"].into_iter();
        let made = private_dir(&base, "p-", || names.next().unwrap().into()).unwrap();
        assert_eq!(made, base.join("p-free"));
        assert!(
            std::fs::symlink_metadata(base.join("p-link"))
                .unwrap()
                .is_symlink()
        );
        assert!(
            std::fs::symlink_metadata(base.join("p-dangling"))
                .unwrap()
                .is_symlink()
        );
        assert!(
            !base.join("nowhere").exists(),
            "a dangling symlink is not followed"
        );
        assert_eq!(
            std::fs::read_to_string(victim.join("marker")).unwrap(),
            "keep"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("p-dir/marker")).unwrap(),
            "keep"
        );
        assert_eq!(
            std::fs::read_to_string(base.join("p-file")).unwrap(),
            "keep"
        );
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1);
        // Only so many tries.
        let mut tries = 0;
        let e = private_dir(&base, "p-", || {
            tries += 1;
            "link".into()
        })
        .unwrap_err();
        assert_eq!(tries, NAME_TRIES);
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains("were all taken"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_base_others_could_rename_in_is_refused() {
        let base = scratch("open");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&base, "p-", random_name)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("writable by others and not sticky (mode 777)"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        // Sticky, as /tmp is: only an entry's owner may rename it.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&base, "p-", random_name).unwrap();
        let e = private_dir(&base.join("missing"), "p-", random_name).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_preload_is_written_privately_and_removed_with_its_directory() {
        let preload = Preload::write(false).unwrap();
        let dir = preload.file.parent().unwrap().to_path_buf();
        assert_eq!(
            std::fs::read_to_string(&preload.file).unwrap(),
            node::PRELOAD
        );
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with(&format!("lb-{}-node-", std::process::id())),
            "{name}"
        );
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!(
            std::fs::metadata(&preload.file).unwrap().mode() & 0o777,
            0o600
        );
        drop(preload);
        assert!(!dir.exists());
    }

    /// For workers of another user: readable by them, writable by the
    /// master alone, in the temp directory.
    #[test]
    fn a_shared_preload_is_readable_by_others() {
        let preload = Preload::write(true).unwrap();
        let dir = preload.file.parent().unwrap().to_path_buf();
        assert!(dir.starts_with(std::env::temp_dir()));
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o711);
        assert_eq!(
            std::fs::metadata(&preload.file).unwrap().mode() & 0o777,
            0o644
        );
        drop(preload);
        assert!(!dir.exists());
    }
}

//! The worker log's path, a pattern: `{pool}`, `{slot}` and `{stream}`
//! (`stdout` or `stderr`) are replaced for each line's worker, so one
//! pattern gives one merged file (no placeholder), a file per pool, per
//! slot or per stream (PM2's per-app out and err files), or any mix.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::format::Stream;

const PLACEHOLDERS: [&str; 3] = ["{pool}", "{slot}", "{stream}"];

/// Checks that every `{` starts a placeholder; the refusal is the
/// `expected` half of a setting's one-line error.
pub fn check(pattern: &OsStr) -> Result<(), String> {
    let bytes = pattern.as_bytes();
    let mut at = 0;
    while let Some(i) = bytes[at..].iter().position(|&b| b == b'{') {
        let rest = &bytes[at + i..];
        match PLACEHOLDERS.iter().find(|p| rest.starts_with(p.as_bytes())) {
            Some(p) => at += i + p.len(),
            None => {
                let end = rest
                    .iter()
                    .position(|&b| b == b'}')
                    .map_or(rest.len(), |e| e + 1);
                return Err(format!(
                    "`{}` is no placeholder; a path may hold {{pool}}, {{slot}} and {{stream}}, \
                     e.g. /var/log/lb/{{pool}}-{{slot}}.{{stream}}.log",
                    String::from_utf8_lossy(&rest[..end.min(32)])
                ));
            }
        }
    }
    if bytes.is_empty() || bytes.ends_with(b"/") {
        return Err("give the path of a file".into());
    }
    Ok(())
}

/// Whether lines of different workers or streams may go to different files.
pub fn varies(pattern: &Path) -> bool {
    let bytes = pattern.as_os_str().as_bytes();
    PLACEHOLDERS
        .iter()
        .any(|p| bytes.windows(p.len()).any(|w| w == p.as_bytes()))
}

/// The file `pattern` names for a line of `pool`'s `slot` on `stream`. A
/// `/` in a pool's name becomes `_`: a name picks a file, never a
/// directory.
pub fn expand(pattern: &Path, pool: &str, slot: usize, stream: Stream) -> PathBuf {
    if !varies(pattern) {
        return pattern.to_path_buf();
    }
    let pool = pool.replace(['/', '\0'], "_");
    let slot = slot.to_string();
    let mut out = Vec::with_capacity(pattern.as_os_str().len() + 16);
    let mut rest = pattern.as_os_str().as_bytes();
    while !rest.is_empty() {
        let hit = PLACEHOLDERS
            .iter()
            .zip([pool.as_str(), slot.as_str(), stream.name()])
            .find(|(p, _)| rest.starts_with(p.as_bytes()));
        match hit {
            Some((p, value)) => {
                out.extend_from_slice(value.as_bytes());
                rest = &rest[p.len()..];
            }
            None => {
                out.push(rest[0]);
                rest = &rest[1..];
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_pick_the_file() {
        let p = Path::new("/var/log/lb/{pool}-{slot}.{stream}.log");
        assert_eq!(
            expand(p, "web", 3, Stream::Stderr),
            Path::new("/var/log/lb/web-3.stderr.log")
        );
        let p = Path::new("/l/{pool}.log");
        assert_eq!(
            expand(p, "a/../b", 0, Stream::Stdout),
            Path::new("/l/a_.._b.log")
        );
        assert!(!varies(Path::new("/l/workers.log")));
        assert_eq!(
            expand(Path::new("/l/w.log"), "x", 1, Stream::Stdout),
            Path::new("/l/w.log")
        );
    }

    #[test]
    fn an_unknown_placeholder_is_refused() {
        assert!(check(OsStr::new("/l/{pool}-{slot}.{stream}.log")).is_ok());
        assert!(check(OsStr::new("/l/w.log")).is_ok());
        let e = check(OsStr::new("/l/{app}.log")).unwrap_err();
        assert!(e.starts_with("`{app}` is no placeholder"), "{e}");
        assert!(check(OsStr::new("/l/{pool")).is_err());
        assert!(check(OsStr::new("/l/")).is_err());
    }
}

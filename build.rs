//! Builds the accept shim (`src/shim/lbshim.c`) into a shared object that
//! the `lb` binary embeds (`shim::LIBRARY`) and hands to shim-mode workers
//! as an in-memory file. C, not Rust: the shim must define the variadic
//! `syscall` and `fcntl`, which stable Rust cannot.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/shim/lbshim.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let so = out.join("liblbshim.so");
    // `cc` finds the C compiler (CC, the target's gcc/clang) and its flags;
    // it builds static archives, so the shared object is linked by hand.
    let compiler = cc::Build::new().opt_level(2).get_compiler();
    let status = Command::new(compiler.path())
        .args([
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-shared",
            "-fPIC",
            "-fvisibility=default",
        ])
        .args(["-o"])
        .arg(&so)
        .arg(src)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {:?}: {e}", compiler.path()));
    assert!(status.success(), "building the accept shim ({src}) failed");
}

//! Config file text for the tests' masters.

use std::path::Path;

use super::lb_bin;

/// A `[[pool]]` of the bundled hello worker.
pub fn hello_pool(name: &str, count: usize) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\ncommand = \"{}\"\nargs = [\"hello-worker\"]\ncount = {count}\n",
        lb_bin()
    )
}

/// A `[[pool]]` running a Python script.
pub fn python_pool(name: &str, script: &str, count: usize) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\ncommand = \"python3\"\nargs = [\"{script}\"]\ncount = {count}\n"
    )
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

//! `lb completions SHELL` and `lb man`: shell completions and the manual
//! page, generated from the CLI definition (so they never drift from
//! `--help`).

use std::io::{self, Write};

use clap::CommandFactory;

use crate::cli::Cli;

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut visible(), "lb", out);
}

/// lb's command line without the subcommands only lb itself runs (some
/// shells' generators would offer hidden subcommands).
fn visible() -> clap::Command {
    use clap::Args;
    let full = Cli::command();
    let base = clap::Command::new("lb")
        .version(env!("CARGO_PKG_VERSION"))
        .args_conflicts_with_subcommands(true);
    full.get_subcommands()
        .filter(|s| !s.is_hide_set())
        .fold(crate::cli::StartArgs::augment_args(base), |cmd, s| {
            cmd.subcommand(s.clone())
        })
}

/// What clap_mangen puts before each section it renders (the `\*(Aq`
/// string); said once, after `.TH`.
const AQ: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

/// What the manual says that `--help` does not: signals, files, examples.
const EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGHUP\fR
Rolling reload, as \fBlb reload\fR: the configuration is read again and each worker replaced, its successor ready first.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Graceful stop: stop accepting, drain every worker for up to \fB\-\-drain\-timeout\fR, then kill. Sent again: stop at once.
.TP
\fBSIGQUIT\fR
Stop at once.
.TP
\fBSIGTTIN\fR, \fBSIGTTOU\fR
One worker more, one fewer.
.TP
\fBSIGUSR1\fR
Reopen the log files (what logrotate's postrotate sends).
.SH ENVIRONMENT
Every option can be given as the environment variable named in its description; the command line wins over the environment, which wins over the configuration file.
.SH FILES
.TP
\fIlb.toml\fR
The configuration file given with \fB\-\-config\fR (see lb.toml.example).
.TP
\fI/run/lb/lb\-<port>.sock\fR
The control socket of a master run as root; \fI$XDG_RUNTIME_DIR/lb\-<port>.sock\fR otherwise.
.SH EXAMPLES
.nf
lb \-\-workers 4 \-\-policy lc \-\- python3 app.py
lb \-\-config /etc/lb/lb.toml \-\-user www\-data \-\-listen 0.0.0.0:80
lb \-\-watch src \-\- node server.js
lb status
lb completions bash > /etc/bash_completion.d/lb
lb man > /usr/local/share/man/man1/lb.1
.fi
"#;

/// The manual page, in roff: lb's own options, then each subcommand's
/// (one page for all, so `man lb` documents every one).
pub fn man(page: &mut dyn Write) -> io::Result<()> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut title = Vec::new();
    man.render_title(&mut title)?;
    let mut body = Vec::new();
    let out = &mut body;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = clap_mangen::Man::new(sub.clone());
        let mut text = Vec::new();
        page.render_synopsis_section(&mut text)?;
        page.render_description_section(&mut text)?;
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            page.render_options_section(&mut text)?;
        }
        // Each of its sections becomes a subsection of this one.
        let text = String::from_utf8_lossy(&text)
            .replace(
                ".SH SYNOPSIS\n",
                &format!(".SS \"lb {}\"\n", sub.get_name()),
            )
            .replace(".SH DESCRIPTION\n", ".PP\n")
            .replace(".SH OPTIONS\n", ".PP\nOptions:\n");
        out.write_all(text.as_bytes())?;
    }
    out.write_all(EXTRA.as_bytes())?;
    man.render_version_section(out)?;
    let strip = |b: &[u8]| String::from_utf8_lossy(b).replace(AQ, "");
    write!(page, "{}{AQ}{}", strip(&title), strip(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manual_is_roff_and_has_every_subcommand_and_option() {
        let mut page = Vec::new();
        man(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.starts_with(".TH lb 1"), "{}", &page[..80]);
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            let named = page.contains(&format!(".SS \"lb {}\"", sub.get_name()));
            assert_eq!(named, !sub.is_hide_set(), "{}", sub.get_name());
        }
        for flag in ["\\-\\-workers", "\\-\\-user", "\\-\\-watch", "\\-\\-json"] {
            assert!(page.contains(flag), "{flag}");
        }
    }

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            completions(shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            for name in ["status", "reload", "completions", "man", "watch", "user"] {
                assert!(script.contains(name), "{shell}: {name}");
            }
            assert!(!script.contains("hello-worker"), "{shell}");
        }
    }
}

//! Refusals, and where the refused value came from.

use std::fmt;

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Flag(&'static str),
    Env(&'static str),
    File(String, &'static str),
    /// Not set: the default of this flag.
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "{flag}"),
            Origin::Env(var) => write!(f, "{var}"),
            Origin::File(path, key) => write!(f, "`{key}` in {path}"),
            Origin::Default(flag) => write!(f, "{flag} (default)"),
        }
    }
}

/// A refusal. Its `Display` is always one line: control characters in the
/// values it quotes (a newline in a path, say) are shown escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Read {
        path: String,
        reason: String,
    },
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    Invalid {
        origin: Origin,
        value: String,
        expected: String,
    },
    Command {
        origin: String,
        command: String,
        reason: &'static str,
    },
    Script {
        origin: String,
        command: String,
        reason: &'static str,
    },
    Conflict(String),
}

impl ConfigError {
    fn message(&self) -> String {
        match self {
            ConfigError::Read { path, reason } => {
                format!("cannot read config file {path}: {reason}; check --config / LB_CONFIG")
            }
            ConfigError::Syntax {
                path,
                line,
                message,
            } => format!("{path}:{line}: {message}; see lb.toml.example for every key"),
            ConfigError::Invalid {
                origin,
                value,
                expected,
            } => format!("invalid {origin} `{value}`: {expected}"),
            ConfigError::Command {
                origin,
                command,
                reason,
            } => format!(
                "worker command `{command}` ({origin}) {reason}; give the path of an executable \
                 or fix PATH"
            ),
            ConfigError::Script {
                origin,
                command,
                reason,
            } => format!(
                "worker command `{command}` ({origin}) {reason}; a Node.js cluster worker runs a \
                 script: node app.js"
            ),
            ConfigError::Conflict(message) => message.clone(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.message().chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The refusal of `value`, which came from `origin`.
pub(crate) fn invalid(origin: Origin, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        value: value.to_string(),
        expected: expected.into(),
    }
}

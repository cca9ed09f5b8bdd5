//! Where a setting's value comes from: the first of the command line, the
//! environment (an empty variable counts as unset) and `lb.toml` that has
//! it, else its default; refused values name that origin.

use std::ffi::OsString;

use super::file::File;
use super::settings::{Setting, Spec};
use super::{ConfigError, EnvFn, Origin, invalid};
use crate::cli::StartArgs;

pub struct Sources<'a> {
    pub args: &'a StartArgs,
    pub env: EnvFn<'a>,
    pub file: File,
    /// The file's path as messages show it (`lb.toml` when there is none).
    pub path: String,
}

impl<'a> Sources<'a> {
    /// The command line and the environment; [`Self::read_file`] adds the
    /// file they name.
    pub fn new(args: &'a StartArgs, env: EnvFn<'a>) -> Self {
        Sources {
            args,
            env,
            file: File::default(),
            path: "lb.toml".into(),
        }
    }

    /// Reads the file `--config` / `LB_CONFIG` names, if any.
    pub fn read_file(&mut self) -> Result<(), ConfigError> {
        if let Some((path, _)) = self.given(&super::settings::CONFIG)? {
            self.file = super::file::load(&path)?;
            self.path = path.display().to_string();
        }
        Ok(())
    }

    /// Where the file's `key` is, for messages.
    pub fn in_file(&self, key: &'static str) -> Origin {
        Origin::File(self.path.clone(), key)
    }

    /// The value as given, unparsed, and where.
    fn raw(&self, s: &Spec) -> Option<(OsString, Origin)> {
        if let Some(v) = self.args.value(s.key) {
            return Some((v.to_owned(), Origin::Flag(s.flag)));
        }
        if let Some(v) = (self.env)(s.env).filter(|v| !v.is_empty()) {
            return Some((v.into(), Origin::Env(s.env)));
        }
        let value = s.file.and_then(|f| f(&self.file))?;
        Some((value.into(), self.in_file(s.key)))
    }

    /// The value given, parsed, and where; `None` if none is.
    pub fn given<T>(&self, s: &Setting<T>) -> Result<Option<(T, Origin)>, ConfigError> {
        let Some((raw, origin)) = self.raw(s) else {
            return Ok(None);
        };
        match (s.parse)(&raw) {
            Ok(v) => Ok(Some((v, origin))),
            Err(expected) => Err(invalid(origin, &raw.to_string_lossy(), expected)),
        }
    }

    /// The value given, or `None` with [`Origin::Default`].
    pub fn optional<T>(&self, s: &Setting<T>) -> Result<(Option<T>, Origin), ConfigError> {
        Ok(match self.given(s)? {
            Some((v, origin)) => (Some(v), origin),
            None => (None, Origin::Default(s.flag)),
        })
    }

    /// The value given, else the setting's default (which the table's tests
    /// check parses).
    pub fn value<T>(&self, s: &Setting<T>) -> Result<T, ConfigError> {
        Ok(self.value_and_origin(s)?.0)
    }

    /// As [`Self::value`], with where it came from ([`Origin::Default`] for
    /// the default).
    pub fn value_and_origin<T>(&self, s: &Setting<T>) -> Result<(T, Origin), ConfigError> {
        if let Some(given) = self.given(s)? {
            return Ok(given);
        }
        let default = s
            .default
            .expect("a setting read with `value` has a default");
        let value = (s.parse)(default.as_ref())
            .map_err(|expected| invalid(Origin::Default(s.flag), default, expected))?;
        Ok((value, Origin::Default(s.flag)))
    }

    /// The value given, else `default` (for settings whose "unset" is a
    /// plain value).
    pub fn value_or<T>(&self, s: &Setting<T>, default: T) -> Result<T, ConfigError> {
        Ok(self.given(s)?.map_or(default, |v| v.0))
    }
}

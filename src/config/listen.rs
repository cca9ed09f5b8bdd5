//! The addresses lb serves (`--listen`, repeatable; `listen =` or
//! `[[listen]]` tables in `lb.toml`): TCP on IPv4 or IPv6, and Unix
//! stream sockets, each with its own backlog and PROXY settings.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::file::Paths;
use super::proxy::{self, Cidr, ProxyProtocol, Untrusted};
use super::run_as::Octal;
use super::{ConfigError, Origin, bounds, error::invalid};

/// Where one listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    /// A Unix stream socket at this path.
    Unix(PathBuf),
}

/// What `--listen` takes, for messages.
pub const EXAMPLE: &str = "127.0.0.1:8000, [::1]:8000 or unix:/run/app.sock";

/// The longest path a `sockaddr_un` holds (108 bytes with its NUL).
const UNIX_PATH_MAX: usize = 107;

impl Address {
    pub fn parse(text: &str) -> Result<Address, String> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(format!("give a path after unix:, e.g. {EXAMPLE}"));
            }
            if path.len() > UNIX_PATH_MAX {
                return Err(format!(
                    "a Unix socket path is at most {UNIX_PATH_MAX} bytes; choose a shorter one"
                ));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        super::parse::address(text, EXAMPLE).map(Address::Tcp)
    }

    /// A comma-separated list (`--listen a,b`, or the flag repeated).
    pub fn parse_list(text: &str) -> Result<Vec<Address>, String> {
        let list = text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(Address::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(format!("give at least one address, e.g. {EXAMPLE}"));
        }
        Ok(list)
    }

    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            Address::Tcp(a) => Some(*a),
            Address::Unix(_) => None,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which PROXY headers a listener reads, and from whom.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProxyRules {
    pub protocol: ProxyProtocol,
    pub trusted: Vec<Cidr>,
    pub untrusted: Untrusted,
}

/// Who owns a Unix socket's file and who may connect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// The file's mode (`chmod`); `None`: what lb's umask gives.
    pub mode: Option<u32>,
    pub owner: Option<nix::unistd::Uid>,
    pub group: Option<nix::unistd::Gid>,
}

/// One listener, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: Address,
    /// Its name: matched against systemd's `LISTEN_FDNAMES`, and given to
    /// shared-mode workers in theirs.
    pub name: Option<String>,
    pub backlog: u32,
    /// `IPV6_V6ONLY` on an IPv6 listener; `None`: the host's default
    /// (`net.ipv6.bindv6only`).
    pub v6only: Option<bool>,
    pub proxy: ProxyRules,
    pub permissions: Permissions,
}

impl Listener {
    /// Whether a PROXY header is read on it.
    pub fn reads_proxy_headers(&self) -> bool {
        self.proxy.protocol.is_on()
    }
}

/// `listen` in `lb.toml`: one address, or a list whose entries are
/// addresses or `[[listen]]` tables (kept as TOML values here, so that a
/// mistake in a table is named by its own key in [`tables`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FileListen {
    One(String),
    Many(Vec<toml::Value>),
}

impl FileListen {
    /// The addresses, as `--listen` takes them (a table's `address`; one
    /// without is left for [`tables`] to refuse).
    pub fn addresses(&self) -> String {
        match self {
            FileListen::One(a) => a.clone(),
            FileListen::Many(list) => list
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    v => v
                        .get("address")
                        .and_then(|a| a.as_str())
                        .unwrap_or("")
                        .to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// A `[[listen]]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub address: String,
    pub name: Option<String>,
    pub backlog: Option<u32>,
    pub v6only: Option<bool>,
    pub proxy_protocol: Option<String>,
    pub proxy_trusted: Option<Paths>,
    pub proxy_untrusted: Option<String>,
    pub mode: Option<Octal>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

/// The file's entries, a table for each (an address alone is a table with
/// nothing else set).
pub fn tables(listen: &FileListen, origin: &Origin) -> Result<Vec<FileListener>, ConfigError> {
    let FileListen::Many(list) = listen else {
        return Ok(vec![FileListener::default()]);
    };
    // One address per entry: the list is read back comma-separated, and a
    // comma inside an entry would move every table after it onto the
    // wrong listener.
    if let Some(bad) = list.iter().find_map(|v| {
        v.as_str()
            .or_else(|| v.get("address").and_then(|a| a.as_str()))
            .filter(|a| a.contains(','))
    }) {
        return Err(invalid(
            origin.clone(),
            bad,
            "holds a comma; give one address per entry of the list (and no comma in a Unix \
             socket's path)",
        ));
    }
    list.iter()
        .map(|v| match v {
            toml::Value::String(_) => Ok(FileListener::default()),
            toml::Value::Table(_) => FileListener::deserialize(v.clone()).map_err(|e| {
                let text = e.to_string();
                invalid(
                    origin.clone(),
                    &v.to_string(),
                    format!(
                        "{}; a [[listen]] table takes address, name, backlog, v6only, \
                         proxy_protocol, proxy_trusted, proxy_untrusted, mode, owner, group",
                        text.lines().next().unwrap_or("").trim()
                    ),
                )
            }),
            other => Err(invalid(
                origin.clone(),
                &other.to_string(),
                format!("give an address or a [[listen]] table, e.g. {EXAMPLE}"),
            )),
        })
        .collect()
}

/// What every listener has unless its table says otherwise.
pub struct Defaults {
    pub backlog: u32,
    pub proxy: ProxyRules,
}

/// The listeners: `addresses` as given, each with its table's settings
/// (tables come only with the file's own list).
pub fn listeners(
    addresses: Vec<Address>,
    tables: Vec<FileListener>,
    defaults: &Defaults,
    origin: &Origin,
) -> Result<Vec<Listener>, ConfigError> {
    let bad = |value: &str, expected: String| invalid(origin.clone(), value, expected);
    let mut out: Vec<Listener> = Vec::with_capacity(addresses.len());
    let mut tables = tables.into_iter();
    for address in addresses {
        let t = tables.next().unwrap_or_default();
        let shown = address.to_string();
        if out.iter().any(|l| l.address == address) {
            return Err(bad(&shown, "is given twice; give each address once".into()));
        }
        let backlog = match t.backlog {
            Some(n) => super::parse::whole_number(&n.to_string(), bounds::BACKLOG_MAX, "")
                .map_err(|e| bad(&n.to_string(), format!("backlog of {shown}: {e}")))?,
            None => defaults.backlog,
        };
        let name = match t.name.clone() {
            Some(n) if n.is_empty() || n.len() > 255 || !n.chars().all(name_char) => {
                return Err(bad(
                    &n,
                    "a listener's name is 1 to 255 letters, digits, `-`, `_` or `.` (systemd's \
                     FileDescriptorName=)"
                        .into(),
                ));
            }
            Some(n) if out.iter().any(|l| l.name.as_deref() == Some(&n)) => {
                return Err(bad(
                    &n,
                    "names two listeners; give each its own name".into(),
                ));
            }
            n => n,
        };
        let v6only = match (t.v6only, &address) {
            (Some(_), Address::Tcp(SocketAddr::V6(_))) | (None, _) => t.v6only,
            (Some(_), _) => {
                return Err(bad(
                    &shown,
                    "v6only is for IPv6 listeners ([::]:PORT); drop it from this one".into(),
                ));
            }
        };
        let mut rules = defaults.proxy.clone();
        if let Some(p) = &t.proxy_protocol {
            rules.protocol = ProxyProtocol::parse(p).ok_or_else(|| {
                bad(
                    p,
                    format!("proxy_protocol of {shown}: {}", ProxyProtocol::CHOICES),
                )
            })?;
        }
        if let Some(nets) = &t.proxy_trusted {
            rules.trusted = proxy::cidrs(&nets.joined())
                .map_err(|e| bad(&nets.joined(), format!("proxy_trusted of {shown}: {e}")))?;
        }
        if let Some(u) = &t.proxy_untrusted {
            rules.untrusted = Untrusted::parse(u).ok_or_else(|| {
                bad(
                    u,
                    format!("proxy_untrusted of {shown}: {}", Untrusted::CHOICES),
                )
            })?;
        }
        let permissions = permissions(&t, &address, &shown, &bad)?;
        out.push(Listener {
            address,
            name,
            backlog,
            v6only,
            proxy: rules,
            permissions,
        });
    }
    if tables.next().is_some() {
        return Err(bad(
            "[[listen]]",
            "a table has no address; give each its `address`".into(),
        ));
    }
    dual_stack(&mut out);
    Ok(out)
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn permissions(
    t: &FileListener,
    address: &Address,
    shown: &str,
    bad: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Permissions, ConfigError> {
    let any = t.mode.is_some() || t.owner.is_some() || t.group.is_some();
    if any && !matches!(address, Address::Unix(_)) {
        return Err(bad(
            shown,
            "mode, owner and group are for Unix socket listeners (unix:/path); drop them from \
             this one"
                .into(),
        ));
    }
    let mode = match &t.mode {
        None => None,
        Some(m) => {
            let text = m.text();
            let digits = text.trim_start_matches("0o");
            match u32::from_str_radix(digits, 8) {
                Ok(n) if n <= 0o777 && !digits.is_empty() => Some(n),
                _ => {
                    return Err(bad(
                        &text,
                        format!("mode of {shown}: give octal permissions, e.g. \"0660\""),
                    ));
                }
            }
        }
    };
    let owner = match &t.owner {
        None => None,
        Some(u) => Some(match u.parse::<u32>() {
            Ok(n) => nix::unistd::Uid::from_raw(n),
            Err(_) => {
                nix::unistd::User::from_name(u)
                    .ok()
                    .flatten()
                    .ok_or_else(|| bad(u, format!("owner of {shown}: no such user")))?
                    .uid
            }
        }),
    };
    let group = match &t.group {
        None => None,
        Some(g) => Some(match g.parse::<u32>() {
            Ok(n) => nix::unistd::Gid::from_raw(n),
            Err(_) => {
                nix::unistd::Group::from_name(g)
                    .ok()
                    .flatten()
                    .ok_or_else(|| bad(g, format!("group of {shown}: no such group")))?
                    .gid
            }
        }),
    };
    Ok(Permissions { mode, owner, group })
}

/// An IPv4 listener beside `[::]:P` on the same port: the IPv6 one must be
/// IPv6-only, or it would take the IPv4 port too and the other bind would
/// fail; unless the configuration says otherwise (then that bind fails).
fn dual_stack(listeners: &mut [Listener]) {
    let v4_any: Vec<u16> = listeners
        .iter()
        .filter_map(|l| l.address.tcp())
        .filter(|a| a.is_ipv4() && a.port() != 0)
        .map(|a| a.port())
        .collect();
    for l in listeners.iter_mut() {
        if let Address::Tcp(a @ SocketAddr::V6(_)) = l.address
            && a.ip().is_unspecified()
            && v4_any.contains(&a.port())
            && l.v6only.is_none()
        {
            l.v6only = Some(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin::Flag("--listen")
    }

    fn defaults() -> Defaults {
        Defaults {
            backlog: 4096,
            proxy: ProxyRules::default(),
        }
    }

    #[test]
    fn addresses_of_every_kind_parse_and_print_as_given() {
        let list = Address::parse_list("127.0.0.1:80, [::1]:8000,unix:/run/a.sock").unwrap();
        let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["127.0.0.1:80", "[::1]:8000", "unix:/run/a.sock"]);
        for bad in ["", " , ", "unix:", "nonsense", "[::1]", "1.2.3.4:99999"] {
            assert!(Address::parse_list(bad).is_err(), "{bad:?}");
        }
        let long = format!("unix:/{}", "a".repeat(120));
        assert!(Address::parse(&long).unwrap_err().contains("at most 107"));
    }

    #[test]
    fn tables_override_the_defaults_for_their_listener_only() {
        let file: FileListen = toml::from_str::<toml::Table>(
            "listen = [\"127.0.0.1:1\", { address = \"unix:/tmp/x.sock\", name = \"api\", \
             backlog = 16, mode = \"0660\", proxy_protocol = \"v2\", proxy_untrusted = \
             \"serve\" }]",
        )
        .unwrap()["listen"]
            .clone()
            .try_into()
            .unwrap();
        let addresses = Address::parse_list(&file.addresses()).unwrap();
        let t = tables(&file, &origin()).unwrap();
        let l = listeners(addresses, t, &defaults(), &origin()).unwrap();
        assert_eq!(l[0].backlog, 4096);
        assert!(!l[0].reads_proxy_headers());
        assert_eq!(l[1].name.as_deref(), Some("api"));
        assert_eq!(l[1].backlog, 16);
        assert_eq!(l[1].permissions.mode, Some(0o660));
        assert_eq!(l[1].proxy.protocol, ProxyProtocol::V2);
        assert_eq!(l[1].proxy.untrusted, Untrusted::Serve);
    }

    #[test]
    fn mistakes_are_refused_in_one_line_naming_the_listener() {
        let run = |text: &str| {
            let file: FileListen = toml::from_str::<toml::Table>(text).unwrap()["listen"]
                .clone()
                .try_into()
                .unwrap();
            let t = tables(&file, &origin()).map_err(|e| e.to_string())?;
            let addresses = Address::parse_list(&file.addresses()).map_err(|e| e.to_string())?;
            listeners(addresses, t, &defaults(), &origin())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let cases = [
            ("listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]", "given twice"),
            (
                "listen = [{ address = \"127.0.0.1:1\", adress = 2 }]",
                "adress",
            ),
            (
                "listen = [{ address = \"127.0.0.1:1\", mode = \"0660\" }]",
                "Unix socket",
            ),
            (
                "listen = [{ address = \"127.0.0.1:1\", v6only = true }]",
                "IPv6",
            ),
            (
                "listen = [{ address = \"unix:/x\", mode = \"999\" }]",
                "octal",
            ),
            (
                "listen = [{ address = \"unix:/x\", owner = \"no-such-user-lb\" }]",
                "no such user",
            ),
            (
                "listen = [{ address = \"[::1]:1\", name = \"a:b\" }]",
                "name",
            ),
            (
                "listen = [{ address = \"[::1]:1\", name = \"a\" }, { address = \"[::1]:2\", \
                 name = \"a\" }]",
                "two listeners",
            ),
            (
                "listen = [{ address = \"[::1]:1\", backlog = 0 }]",
                "backlog",
            ),
            (
                "listen = [{ address = \"[::1]:1\", proxy_protocol = \"v3\" }]",
                "v1",
            ),
            ("listen = [3]", "an address or a [[listen]] table"),
            (
                "listen = [\"127.0.0.1:1,127.0.0.1:2\", { address = \"127.0.0.1:3\" }]",
                "one address per entry",
            ),
        ];
        for (text, want) in cases {
            let e = run(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn the_ipv6_wildcard_beside_the_ipv4_one_is_ipv6_only() {
        let l = |text: &str| {
            listeners(
                Address::parse_list(text).unwrap(),
                vec![],
                &defaults(),
                &origin(),
            )
            .unwrap()
        };
        let both = l("0.0.0.0:80,[::]:80");
        assert_eq!(both[1].v6only, Some(true));
        assert_eq!(l("[::]:80")[0].v6only, None, "alone: the host's default");
        assert_eq!(l("0.0.0.0:80,[::]:81")[1].v6only, None);
        assert_eq!(l("127.0.0.1:80,[::]:80")[1].v6only, Some(true));
    }
}

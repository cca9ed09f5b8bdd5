//! The PROXY protocol settings (`docs/proxy-protocol.md`): which header
//! lb reads on its listener and from whom, and which one it writes to a
//! proxy-mode worker's port.

use std::fmt;
use std::net::IpAddr;

use super::{Config, ConfigError, Mode};

/// Which PROXY header lb expects at the start of each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    /// None: the first bytes are the application's.
    #[default]
    Off,
    V1,
    V2,
    /// Either, told apart by their first bytes.
    Any,
}

impl ProxyProtocol {
    pub const CHOICES: &'static str = "use off, v1, v2 or any";

    pub fn parse(text: &str) -> Option<ProxyProtocol> {
        match text.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "false" | "no" => Some(ProxyProtocol::Off),
            "v1" | "1" => Some(ProxyProtocol::V1),
            "v2" | "2" => Some(ProxyProtocol::V2),
            "any" | "on" => Some(ProxyProtocol::Any),
            _ => None,
        }
    }

    pub fn is_on(self) -> bool {
        self != ProxyProtocol::Off
    }

    pub fn takes_v1(self) -> bool {
        matches!(self, ProxyProtocol::V1 | ProxyProtocol::Any)
    }

    pub fn takes_v2(self) -> bool {
        matches!(self, ProxyProtocol::V2 | ProxyProtocol::Any)
    }
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
            ProxyProtocol::Any => "any",
        })
    }
}

/// What becomes of a connection from outside `proxy_trusted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Untrusted {
    /// Closed and counted: only the balancer may say who the client is.
    #[default]
    Refuse,
    /// Served as a direct client: no header is expected from it.
    Serve,
}

impl Untrusted {
    pub const CHOICES: &'static str = "use refuse or serve";

    pub fn parse(text: &str) -> Option<Untrusted> {
        match text.trim().to_ascii_lowercase().as_str() {
            "refuse" | "close" => Some(Untrusted::Refuse),
            "serve" => Some(Untrusted::Serve),
            _ => None,
        }
    }
}

/// The header lb writes to a proxy-mode worker's port before relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendProxy {
    #[default]
    Off,
    V1,
    V2,
}

impl SendProxy {
    pub const CHOICES: &'static str = "use off, v1 or v2";

    pub fn parse(text: &str) -> Option<SendProxy> {
        match text.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "false" | "no" => Some(SendProxy::Off),
            "v1" | "1" => Some(SendProxy::V1),
            "v2" | "2" => Some(SendProxy::V2),
            _ => None,
        }
    }
}

impl fmt::Display for SendProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendProxy::Off => "off",
            SendProxy::V1 => "v1",
            SendProxy::V2 => "v2",
        })
    }
}

/// One network, `10.0.0.0/8` or `2001:db8::/32` (a bare address is
/// that one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| {
            format!("`{text}` is not a network: give one like 10.0.0.0/8 or 2001:db8::/32")
        })?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => {
                    return Err(format!(
                        "`{text}`: the prefix length must be 0 to {max} for an IPv{} network",
                        if net.is_ipv4() { 4 } else { 6 }
                    ));
                }
            },
        };
        let cidr = Cidr { net, prefix };
        let masked = cidr.masked();
        if masked != net {
            return Err(format!(
                "`{text}` has bits set past its /{prefix}: write {masked}/{prefix}"
            ));
        }
        Ok(cidr)
    }

    /// The network address with the host bits cleared.
    fn masked(&self) -> IpAddr {
        match self.net {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(self.prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(self.prefix)).into()),
        }
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address, as a
    /// dual-stack listener reports IPv4 peers, counts as its IPv4 one).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Comma-separated networks (at least one).
pub fn cidrs(text: &str) -> Result<Vec<Cidr>, String> {
    let list: Vec<Cidr> = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Cidr::parse)
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(
            "give the balancers' networks, comma-separated, e.g. 10.0.0.0/8,fd00::/8".into(),
        );
    }
    Ok(list)
}

/// Whether `ip` is in any of `nets`.
#[inline]
pub fn trusted(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

/// Refuses what cannot work with a PROXY header on the listener. (Kernel
/// dispatch is refused by `Dispatch::kernel_refusal`, so `auto` falls back.)
pub fn check(config: &Config) -> Result<(), ConfigError> {
    for l in config.listeners.iter().filter(|l| l.reads_proxy_headers()) {
        let rules = &l.proxy;
        // (A Unix listener's clients have no address to trust: its header
        // is read from whoever connects, which the file's mode controls.)
        let unix = matches!(l.address, super::Address::Unix(_));
        if !unix && rules.trusted.is_empty() && rules.untrusted == Untrusted::Refuse {
            return Err(ConfigError::Conflict(format!(
                "proxy_protocol is {} on {} but proxy_trusted names no balancer, so every \
                 connection would be refused: set --proxy-trusted to the networks your \
                 balancers connect from (e.g. 10.0.0.0/8), or --proxy-untrusted serve",
                rules.protocol, l.address
            )));
        }
        if let Some(p) = config.pools.iter().find(|p| p.mode == Mode::Shared) {
            return Err(ConfigError::Conflict(format!(
                "proxy_protocol is {} on {} but pool `{}` is mode shared, whose workers accept \
                 from lb's listener themselves and would read the PROXY header as the client's \
                 first bytes: use mode native, shim, node or proxy (lb reads the header and \
                 hands on the rest), or proxy_protocol off",
                rules.protocol, l.address, p.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_match_their_hosts_only() {
        let nets = cidrs("10.0.0.0/8, 192.168.1.7,2001:db8::/32,0.0.0.0/0").unwrap();
        assert_eq!(nets[1].to_string(), "192.168.1.7/32");
        let ten = nets[0];
        assert!(ten.contains("10.200.3.4".parse().unwrap()));
        assert!(!ten.contains("11.0.0.1".parse().unwrap()));
        assert!(ten.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(nets[2].contains("2001:db8:1::9".parse().unwrap()));
        assert!(!nets[2].contains("2001:db9::1".parse().unwrap()));
        assert!(nets[3].contains("203.0.113.1".parse().unwrap()));
        assert!(!nets[3].contains("::1".parse().unwrap()));
        assert!(
            Cidr::parse("::/0")
                .unwrap()
                .contains("::1".parse().unwrap())
        );
    }

    #[test]
    fn bad_networks_say_the_fix() {
        assert!(
            Cidr::parse("10.0.0.1/8")
                .unwrap_err()
                .contains("write 10.0.0.0/8")
        );
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("0 to 32"));
        assert!(Cidr::parse("ten").unwrap_err().contains("10.0.0.0/8"));
        assert!(cidrs(" , ").is_err());
    }
}

//! Who a request comes from: the TCP peer, or — only when that peer is a configured trusted
//! reverse proxy — the address the proxy forwarded. A forwarded header from anyone else is
//! ignored, so a client cannot pick its own identity (and escape its lockout) by sending one.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client address a request is attributed to (lockouts, rate of audit records, pseudonym).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// `trusted_proxies` from the configuration.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses addresses (`10.0.0.1`, `::1`) and CIDR ranges (`10.0.0.0/8`).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("trusted_proxies: {e:?} is not an address or CIDR range"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    /// Whether `ip` is a configured proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind `peer`: the right-most address in `X-Forwarded-For` that is not itself
    /// a trusted proxy, when `peer` is one; otherwise `peer`. A malformed header from a trusted
    /// proxy falls back to the proxy's own address (fail closed: it shares one identity).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if self.0.is_empty() || !self.contains(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            for part in text.split(',') {
                match part.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(canonical(ip)),
                    Err(_) => return peer,
                }
            }
        }
        hops.into_iter()
            .rev()
            .find(|ip| !self.contains(*ip))
            .unwrap_or(peer)
    }
}

/// The key that per-client limits use (lockouts, connection caps, audit sampling): an IPv4
/// address, or the /64 network of an IPv6 address (one subscriber's allocation: an attacker
/// with a /64 has 2^64 addresses and must not get 2^64 allowances).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.1".into()]).unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        // Anyone else's header is ignored.
        assert_eq!(proxies.client(outsider, &headers(&["1.2.3.4"])), outsider);
        // From a trusted proxy: the right-most untrusted hop (a client cannot prepend its way
        // to another identity).
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            proxies.client(proxy, &headers(&["6.6.6.6, 198.51.100.7", "10.9.9.9"])),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // Malformed or missing: the proxy's own address.
        assert_eq!(proxies.client(proxy, &headers(&["nonsense"])), proxy);
        assert_eq!(proxies.client(proxy, &headers(&[])), proxy);
        // No proxies configured: never believed.
        let none = TrustedProxies::default();
        assert_eq!(none.client(proxy, &headers(&["1.2.3.4"])), proxy);
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn ipv6_clients_are_limited_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(limit_key(v4), v4);
        assert_eq!(limit_key("::ffff:192.0.2.7".parse().unwrap()), v4);
    }
}

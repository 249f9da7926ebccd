//! Where mail for a domain goes: the relay host, or the domain's MX hosts
//! in the order RFC 5321 5.1 gives, each with its addresses.

use std::net::{IpAddr, SocketAddr};

use common::dns::{self, HostAnswer, MxAnswer};
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;

/// Most addresses tried for one delivery (Postfix's smtp_mx_address_limit
/// is 5; a domain with more MX hosts than that is misconfigured).
const MAX_HOPS: usize = 10;

/// One server to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// The host name (MX exchange, relay host, or the address itself).
    pub name: String,
    pub addr: SocketAddr,
}

impl Hop {
    /// `name[ip]:port`, as Postfix logs `relay=`.
    pub fn relay(&self) -> String {
        format!("{self}:{}", self.addr.port())
    }
}

impl std::fmt::Display for Hop {
    /// `name[ip]`, as Postfix names a server in "host ... said".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.name, self.addr.ip())
    }
}

/// The servers to try, in order, or why there are none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Hops(Vec<Hop>),
    /// Permanent: an RFC 3463 status and reason.
    Fail(String),
    /// Temporary: an RFC 3463 status and reason.
    Defer(String),
}

/// What routing needs to know about this installation.
pub struct Router {
    pub resolver: TokioResolver,
    /// Our own name: an MX record naming it points back at us.
    pub hostname: String,
    /// Our MX listeners: a hop to one of them would deliver to ourselves.
    pub own_listeners: Vec<SocketAddr>,
    pub remote_port: u16,
}

impl Router {
    /// Route mail for `domain` via its MX hosts.
    pub async fn mx_route(&self, domain: &str) -> Route {
        if let Some(ip) = domain_literal(domain) {
            return self.filter_self(vec![Hop {
                name: ip.to_string(),
                addr: SocketAddr::new(ip, self.remote_port),
            }]);
        }
        let hosts = match dns::mx(&self.resolver, domain).await {
            MxAnswer::Hosts(records) => {
                match order_mx(records, &self.hostname, &mut rand::thread_rng()) {
                    Some(hosts) => hosts,
                    None => {
                        return Route::Fail(format!(
                            "5.4.6 mail for {domain} loops back to myself ({} is its best MX host)",
                            self.hostname
                        ))
                    }
                }
            }
            MxAnswer::Implicit => vec![domain.to_ascii_lowercase()],
            MxAnswer::NullMx => {
                return Route::Fail(format!(
                    "5.1.10 domain {domain} does not accept mail (null MX, RFC 7505)"
                ))
            }
            MxAnswer::NoDomain => {
                return Route::Fail(format!("5.1.2 domain {domain} does not exist (NXDOMAIN)"))
            }
            MxAnswer::TryLater(e) => {
                return Route::Defer(format!("4.4.3 DNS lookup of MX for {domain} failed: {e}"))
            }
        };
        let route = self.resolve_hosts(&hosts, self.remote_port).await;
        match route {
            Route::Hops(hops) => self.filter_self(hops),
            Route::Fail(_) => Route::Fail(format!(
                "5.4.4 no address found for the mail hosts of {domain} ({})",
                hosts.join(", ")
            )),
            Route::Defer(e) => Route::Defer(format!(
                "4.4.3 DNS lookup of the mail hosts of {domain} failed: {e}"
            )),
        }
    }

    /// Route to the relay host: its address records only, never MX
    /// (Postfix's `relayhost = [host]`).
    pub async fn relay_route(&self, host: &str, port: u16) -> Route {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Route::Hops(vec![Hop {
                name: ip.to_string(),
                addr: SocketAddr::new(ip, port),
            }]);
        }
        match self.resolve_hosts(&[host.to_string()], port).await {
            Route::Hops(hops) => Route::Hops(hops),
            // A relay host that does not resolve is a configuration
            // problem, not the recipient's: wait for the admin.
            Route::Fail(_) => Route::Defer(format!("4.4.4 relay host {host} has no address")),
            Route::Defer(e) => {
                Route::Defer(format!("4.4.3 DNS lookup of relay host {host} failed: {e}"))
            }
        }
    }

    /// The addresses of `hosts`, in order; Fail when none has any, Defer
    /// when none was found and a lookup failed for now.
    async fn resolve_hosts(&self, hosts: &[String], port: u16) -> Route {
        let mut hops = Vec::new();
        let mut temporary = None;
        for host in hosts {
            if hops.len() >= MAX_HOPS {
                break;
            }
            match dns::host_addresses(&self.resolver, host).await {
                HostAnswer::Found(addrs) => hops.extend(addrs.into_iter().map(|ip| Hop {
                    name: host.clone(),
                    addr: SocketAddr::new(ip, port),
                })),
                HostAnswer::NoHost => {}
                HostAnswer::TryLater(e) => temporary = Some(format!("{host}: {e}")),
            }
        }
        hops.truncate(MAX_HOPS);
        match (hops.is_empty(), temporary) {
            (false, _) => Route::Hops(hops),
            (true, Some(e)) => Route::Defer(e),
            (true, None) => Route::Fail(String::new()),
        }
    }

    /// Drop hops that are this installation; if one was, hops after it are
    /// no better, so drop them too (RFC 5321 5.1: a host listed as an MX
    /// only tries hosts of lower preference value than its own).
    fn filter_self(&self, hops: Vec<Hop>) -> Route {
        let first_self = hops.iter().position(|h| self.is_own(h.addr));
        match first_self {
            Some(0) => Route::Fail(format!(
                "5.4.6 mail loops back to myself ({} is our own address)",
                hops[0].addr
            )),
            Some(n) => Route::Hops(hops.into_iter().take(n).collect()),
            None => Route::Hops(hops),
        }
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own_listeners.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == addr.ip() || (l.ip().is_unspecified() && addr.ip().is_loopback()))
        })
    }
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3).
fn domain_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse().ok(),
        _ => inner.parse().ok(),
    }
}

/// MX hosts by preference, equal ones shuffled (RFC 5321 5.1). When
/// `own_name` is among them, only hosts preferred to it remain; None when
/// it is the best (the mail would loop).
fn order_mx<R: rand::Rng>(
    mut records: Vec<(u16, String)>,
    own_name: &str,
    rng: &mut R,
) -> Option<Vec<String>> {
    records.shuffle(rng);
    // A stable sort keeps the shuffled order within each preference.
    records.sort_by_key(|(preference, _)| *preference);
    let own = records
        .iter()
        .find(|(_, host)| host.eq_ignore_ascii_case(own_name))
        .map(|(p, _)| *p);
    if let Some(own) = own {
        records.retain(|(p, _)| *p < own);
        if records.is_empty() {
            return None;
        }
    }
    let mut hosts: Vec<String> = Vec::with_capacity(records.len());
    for (_, host) in records {
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    Some(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rec(v: &[(u16, &str)]) -> Vec<(u16, String)> {
        v.iter().map(|(p, h)| (*p, h.to_string())).collect()
    }

    #[test]
    fn mx_sorted_by_preference_with_equals_shuffled() {
        let records = rec(&[(20, "c"), (10, "a"), (10, "b"), (30, "d")]);
        let mut seen_first = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let hosts = order_mx(records.clone(), "me", &mut rng).unwrap();
            assert_eq!(&hosts[2..], ["c", "d"]);
            seen_first.insert(hosts[0].clone());
        }
        assert_eq!(
            seen_first.len(),
            2,
            "both preference-10 hosts come first sometimes"
        );
    }

    #[test]
    fn own_name_cuts_the_list() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let records = rec(&[(10, "a"), (20, "ME"), (30, "b")]);
        assert_eq!(order_mx(records, "me", &mut rng).unwrap(), ["a"]);
        let records = rec(&[(10, "me"), (20, "b")]);
        assert_eq!(order_mx(records, "me", &mut rng), None);
    }

    #[test]
    fn domain_literals() {
        assert_eq!(domain_literal("[192.0.2.1]"), "192.0.2.1".parse().ok());
        assert_eq!(
            domain_literal("[IPv6:2001:db8::1]"),
            "2001:db8::1".parse().ok()
        );
        assert_eq!(domain_literal("example.org"), None);
        assert_eq!(domain_literal("[bogus]"), None);
    }
}

//! DNS block and allow lists (RFC 5782) of the client address at
//! connect: each list that has the address adds its weight (negative for
//! an allow list); at the threshold the client is refused.

use std::net::{IpAddr, Ipv4Addr};

use common::config::DnsList;
use futures_util::future::join_all;
use hickory_resolver::TokioResolver;

/// The lists and the threshold, set up once per smtpd.
pub struct Dnsbl {
    resolver: TokioResolver,
    lists: Vec<DnsList>,
    threshold: i32,
}

/// A client the lists refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The block lists that have the address.
    pub zones: Vec<String>,
    pub score: i32,
}

impl Dnsbl {
    pub fn new(resolver: TokioResolver, lists: Vec<DnsList>, threshold: i32) -> Dnsbl {
        Dnsbl {
            resolver,
            lists,
            threshold,
        }
    }

    /// Ask every list about `ip`; Some when the weights reach the
    /// threshold. A list that does not answer counts as not listing.
    pub async fn check(&self, ip: IpAddr) -> Option<Listed> {
        if self.lists.is_empty() {
            return None;
        }
        let answers = join_all(self.lists.iter().map(|list| async move {
            let name = query_name(ip, &list.zone);
            let codes: Vec<Ipv4Addr> = match self.resolver.ipv4_lookup(name).await {
                Ok(lookup) => lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        hickory_resolver::proto::rr::RData::A(a) => Some(a.0),
                        _ => None,
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            if let Some(code) = codes.iter().find(|c| is_refusal(**c)) {
                // Spamhaus answers so when asked through a public
                // resolver: the list then protects nothing.
                tracing::warn!(
                    "{} refused the query ({code}): ask it through your own resolver",
                    list.zone
                );
            }
            let found = codes.iter().any(|code| list.counts(*code));
            (list, found)
        }))
        .await;
        let mut score = 0;
        let mut zones = Vec::new();
        for (list, found) in answers {
            if found {
                score += list.weight;
                if list.weight > 0 {
                    zones.push(list.zone.clone());
                }
            }
        }
        (score >= self.threshold && !zones.is_empty()).then_some(Listed { zones, score })
    }
}

/// Spamhaus's answers for a refused query or an error (127.255.255.x).
fn is_refusal(code: Ipv4Addr) -> bool {
    let [a, b, c, _] = code.octets();
    (a, b, c) == (127, 255, 255)
}

/// RFC 5782 2.1 and 2.4: the address's octets, or its 32 nibbles, in
/// reverse, then the zone; absolute.
fn query_name(ip: IpAddr, zone: &str) -> String {
    let reversed: Vec<String> = match ip {
        IpAddr::V4(v4) => v4.octets().iter().rev().map(|o| o.to_string()).collect(),
        IpAddr::V6(v6) => v6
            .octets()
            .iter()
            .rev()
            .flat_map(|b| [b & 0xf, b >> 4])
            .map(|n| format!("{n:x}"))
            .collect(),
    };
    format!("{}.{}.", reversed.join("."), zone.trim_end_matches('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "bl.test"),
            "99.2.0.192.bl.test."
        );
        // RFC 5782 2.4's example.
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com."
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
    }
}

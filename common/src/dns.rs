//! The one DNS resolver setup, and the lookups mail routing needs, with
//! every answer sorted into "use this", "bounce" or "try later".

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::DnsConfig;

/// The resolver could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver: {0}")]
pub struct SetupError(#[from] NetError);

/// A resolver asking `cfg.servers`, or those of `/etc/resolv.conf`.
pub fn resolver(cfg: &DnsConfig) -> Result<TokioResolver, SetupError> {
    let mut builder = if cfg.servers.is_empty() {
        Resolver::builder(TokioRuntimeProvider::default())?
    } else {
        let servers = cfg.servers.iter().map(name_server).collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(ResolverOpts::default())
    };
    let opts = builder.options_mut();
    opts.timeout = Duration::from_secs(cfg.timeout);
    opts.attempts = cfg.attempts;
    // An MTA routes by the DNS alone (Postfix's smtp_host_lookup = dns);
    // /etc/hosts would also make tests depend on the machine.
    opts.use_hosts_file = ResolveHosts::Never;
    opts.negative_max_ttl = Some(Duration::from_secs(300));
    Ok(builder.build()?)
}

fn name_server(addr: &SocketAddr) -> NameServerConfig {
    let (mut udp, mut tcp) = (ConnectionConfig::udp(), ConnectionConfig::tcp());
    udp.port = addr.port();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

/// What the DNS says about where mail for a domain goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// MX records as served: (preference, exchange), exchange without the
    /// trailing dot, lowercase.
    Hosts(Vec<(u16, String)>),
    /// No MX records: the domain itself is the mail host (RFC 5321 5.1).
    Implicit,
    /// The domain accepts no mail (RFC 7505 null MX).
    NullMx,
    /// The domain does not exist.
    NoDomain,
    /// The DNS failed for now.
    TryLater(String),
}

/// Addresses of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostAnswer {
    /// IPv6 addresses first, then IPv4 ones.
    Found(Vec<IpAddr>),
    /// The host does not exist or has no address.
    NoHost,
    /// The DNS failed for now.
    TryLater(String),
}

fn fqdn(domain: &str) -> Option<Name> {
    // from_utf8 applies IDNA, which RFC 6531 domains in U-labels need.
    let mut name = Name::from_utf8(domain).ok()?;
    name.set_fqdn(true);
    Some(name)
}

fn exchange_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// Look up the MX records of `domain`.
pub async fn mx(resolver: &TokioResolver, domain: &str) -> MxAnswer {
    let Some(name) = fqdn(domain) else {
        return MxAnswer::NoDomain;
    };
    match resolver.mx_lookup(name).await {
        Ok(lookup) => {
            let records: Vec<(u16, &Name)> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, &mx.exchange)),
                    _ => None,
                })
                .collect();
            match records.as_slice() {
                [] => MxAnswer::Implicit,
                // RFC 7505 3: a single record with the root as exchange.
                [(_, x)] if x.is_root() => MxAnswer::NullMx,
                _ => MxAnswer::Hosts(
                    records
                        .into_iter()
                        .filter(|(_, x)| !x.is_root())
                        .map(|(p, x)| (p, exchange_name(x)))
                        .collect(),
                ),
            }
        }
        Err(e) if e.is_nx_domain() => MxAnswer::NoDomain,
        Err(e) if is_no_data(&e) => MxAnswer::Implicit,
        Err(e) => MxAnswer::TryLater(e.to_string()),
    }
}

/// NOERROR with no record of the asked type.
fn is_no_data(e: &NetError) -> bool {
    matches!(e, NetError::Dns(DnsError::NoRecordsFound(n)) if n.response_code == ResponseCode::NoError)
}

/// Look up the IPv6 and IPv4 addresses of `host`.
pub async fn host_addresses(resolver: &TokioResolver, host: &str) -> HostAnswer {
    let Some(name) = fqdn(host) else {
        return HostAnswer::NoHost;
    };
    let (v6, v4) = tokio::join!(
        resolver.ipv6_lookup(name.clone()),
        resolver.ipv4_lookup(name)
    );
    let mut found = Vec::new();
    let mut temporary = None;
    for result in [v6, v4] {
        match result {
            Ok(lookup) => found.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            })),
            Err(e) if e.is_no_records_found() => {}
            Err(e) => temporary = Some(e.to_string()),
        }
    }
    match (found.is_empty(), temporary) {
        (false, _) => HostAnswer::Found(found),
        (true, Some(e)) => HostAnswer::TryLater(e),
        (true, None) => HostAnswer::NoHost,
    }
}

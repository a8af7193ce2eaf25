//! Where mail for a domain goes (RFC 5321 §5.1): its MX hosts in preference order, each with
//! its addresses; the domain itself when it has no MX; nowhere when it publishes a null MX
//! (RFC 7505) or does not exist.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

/// One mail exchanger: its name (for TLS and logs) and addresses to try in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub host: String,
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The domain cannot receive mail: bounce.
    #[error("{0}")]
    Permanent(String),
    /// DNS did not answer usefully now: retry later.
    #[error("{0}")]
    Temporary(String),
}

pub struct Dns {
    resolver: TokioResolver,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dns")
    }
}

impl Dns {
    /// A resolver asking `server`, or the system's name servers when `None`.
    pub fn new(server: Option<SocketAddr>) -> anyhow::Result<Dns> {
        let config = match server {
            Some(addr) => {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = addr.port();
                        c
                    })
                    .collect();
                let ns = NameServerConfig::new(addr.ip(), true, connections);
                ResolverConfig::from_name_servers(vec![ns])
            }
            None => system_config()?,
        };
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        )
        .build()
        .map_err(|e| anyhow::anyhow!("DNS resolver: {e}"))?;
        Ok(Dns { resolver })
    }

    /// The mail exchangers of `domain`, most preferred first.
    pub async fn routes(&self, domain: &str) -> Result<Vec<Route>, RouteError> {
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        let hosts = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let records = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                exchangers(domain, records)?
            }
            Err(e) if e.is_nx_domain() => {
                return Err(RouteError::Permanent(format!("no such domain: {domain}")))
            }
            // No MX: the domain's own address is its mail exchanger (RFC 5321 §5.1).
            Err(e) if e.is_no_records_found() => vec![fqdn.clone()],
            Err(e) => {
                return Err(RouteError::Temporary(format!(
                    "MX lookup for {domain} failed: {e}"
                )))
            }
        };
        let mut routes = Vec::new();
        let mut temporary = None;
        for host in hosts {
            match self.resolver.lookup_ip(host.as_str()).await {
                Ok(ips) => {
                    let addrs: Vec<IpAddr> = ips.iter().collect();
                    if !addrs.is_empty() {
                        routes.push(Route {
                            host: host.trim_end_matches('.').to_string(),
                            addrs,
                        });
                    }
                }
                Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
                Err(e) => temporary = Some(format!("address lookup for {host} failed: {e}")),
            }
        }
        if routes.is_empty() {
            return Err(match temporary {
                Some(why) => RouteError::Temporary(why),
                None => RouteError::Permanent(format!("no mail exchanger found for {domain}")),
            });
        }
        Ok(routes)
    }
}

impl Dns {
    /// The addresses of a host (a smarthost named in the configuration).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, RouteError> {
        let fqdn = format!("{}.", host.trim_end_matches('.'));
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(ips) if ips.iter().next().is_some() => Ok(ips.iter().collect()),
            Ok(_) => Err(RouteError::Temporary(format!("{host} has no address"))),
            Err(e) => Err(RouteError::Temporary(format!(
                "address lookup for {host} failed: {e}"
            ))),
        }
    }
}

/// MX records in the order to try them: lowest preference first (ties in name order, so
/// every node tries them alike); a null MX (RFC 7505) means the domain takes no mail.
fn exchangers(domain: &str, mut records: Vec<(u16, String)>) -> Result<Vec<String>, RouteError> {
    records.sort();
    if records
        .iter()
        .any(|(_, host)| host == "." || host.is_empty())
    {
        return Err(RouteError::Permanent(format!(
            "{domain} does not accept mail (null MX)"
        )));
    }
    Ok(records.into_iter().map(|(_, host)| host).collect())
}

/// Name servers from /etc/resolv.conf (127.0.0.1 when it names none, as libc does).
fn system_config() -> anyhow::Result<ResolverConfig> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut servers: Vec<NameServerConfig> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(NameServerConfig::udp_and_tcp)
        .collect();
    if servers.is_empty() {
        servers.push(NameServerConfig::udp_and_tcp(IpAddr::from([127, 0, 0, 1])));
    }
    Ok(ResolverConfig::from_name_servers(servers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchangers_are_tried_by_preference_and_a_null_mx_refuses_mail() {
        // Goal: RFC 5321 §5.1 order (lowest preference first), and RFC 7505's null MX is a
        // permanent failure, not a host named ".".
        let records = vec![
            (20, "b.far.test.".to_string()),
            (5, "z.far.test.".to_string()),
            (20, "a.far.test.".to_string()),
        ];
        assert_eq!(
            exchangers("far.test", records).unwrap(),
            ["z.far.test.", "a.far.test.", "b.far.test."]
        );
        assert!(matches!(
            exchangers("null.test", vec![(0, ".".to_string())]),
            Err(RouteError::Permanent(_))
        ));
    }
}

//! Broker URLs: `https://host:port` and the schemes that force a transport.

use std::fmt;
use std::str::FromStr;

use crate::{NetError, UrlError};

/// The port a broker URL without one means.
pub const DEFAULT_PORT: u16 = 8443;

/// Which transport to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// QUIC first, TLS over TCP when QUIC does not connect (UDP blocked).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

/// A parsed broker URL: host, port and transport preference.
///
/// `https://host:port` and `fem://host:port` mean QUIC falling back to TLS
/// over TCP; `quic://` forces QUIC, `tls://` and `tcp://` force TLS over TCP.
/// The port defaults to [`DEFAULT_PORT`]. An IPv6 address goes in brackets
/// (`https://[::1]:8443`); [`BrokerUrl::host`] returns it without them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    host: String,
    port: u16,
    transport: Transport,
}

impl BrokerUrl {
    /// Parses a broker URL.
    ///
    /// # Errors
    /// [`NetError::Url`]: not a URL, an unknown scheme, or no host.
    pub fn parse(url: &str) -> Result<Self, NetError> {
        let err = |source: UrlError| NetError::Url {
            url: url.to_owned(),
            source,
        };
        let u = url::Url::parse(url).map_err(|e| err(e.into()))?;
        let transport = match u.scheme() {
            "https" | "fem" => Transport::Auto,
            "quic" => Transport::Quic,
            "tls" | "tcp" => Transport::Tcp,
            s => return Err(err(UrlError::UnknownScheme(s.to_owned()))),
        };
        let host = match u.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(err(UrlError::NoHost)),
        };
        // The url crate drops a port equal to the scheme's default (443 for
        // https), which must not then read as no port.
        let port = match u.port() {
            Some(p) => p,
            None => u
                .port_or_known_default()
                .filter(|_| has_port(url))
                .unwrap_or(DEFAULT_PORT),
        };
        Ok(Self {
            host,
            port,
            transport,
        })
    }

    /// The host: a name or an IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The transport the scheme asks for.
    pub fn transport(&self) -> Transport {
        self.transport
    }
}

impl FromStr for BrokerUrl {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        Self::parse(s)
    }
}

impl fmt::Display for BrokerUrl {
    /// The canonical form: `https://`, `quic://` or `tls://`, then
    /// [`endpoint`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Auto => "https",
            Transport::Quic => "quic",
            Transport::Tcp => "tls",
        };
        write!(f, "{scheme}://{}", endpoint(&self.host, self.port))
    }
}

/// Whether the authority of a URL that parsed gives a port.
fn has_port(url: &str) -> bool {
    let rest = url.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let after_host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, r)| r),
        None => host_port.find(':').map_or("", |i| &host_port[i..]),
    };
    after_host.len() > 1
}

/// `host:port`, with an IPv6 address in brackets.
pub fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parsed(s: &str) -> (String, u16, Transport) {
        let u = BrokerUrl::parse(s).unwrap();
        (u.host().to_owned(), u.port(), u.transport())
    }

    #[test]
    fn schemes_choose_the_transport() {
        let h = |t| ("broker.example".to_owned(), 9000, t);
        assert_eq!(parsed("https://broker.example:9000"), h(Transport::Auto));
        assert_eq!(parsed("fem://broker.example:9000"), h(Transport::Auto));
        assert_eq!(parsed("quic://broker.example:9000"), h(Transport::Quic));
        assert_eq!(parsed("tls://broker.example:9000"), h(Transport::Tcp));
        assert_eq!(parsed("tcp://broker.example:9000"), h(Transport::Tcp));
    }

    #[test]
    fn default_port() {
        assert_eq!(parsed("https://localhost").1, DEFAULT_PORT);
        assert_eq!(parsed("quic://10.1.2.3").1, DEFAULT_PORT);
        assert_eq!(parsed("https://localhost:").1, DEFAULT_PORT);
        // A port equal to the scheme's default is still that port.
        assert_eq!(parsed("https://localhost:443").1, 443);
        assert_eq!(parsed("https://[::1]:443/x").1, 443);
        assert_eq!(parsed("https://user@localhost:443").1, 443);
        assert_eq!(parsed("https://[::1]").1, DEFAULT_PORT);
        assert_eq!(parsed("https://localhost/a:443").1, DEFAULT_PORT);
    }

    #[test]
    fn ip_addresses() {
        assert_eq!(
            parsed("https://127.0.0.1:8443"),
            ("127.0.0.1".into(), 8443, Transport::Auto)
        );
        assert_eq!(
            parsed("quic://127.0.0.2:1"),
            ("127.0.0.2".into(), 1, Transport::Quic)
        );
        assert_eq!(
            parsed("https://[::1]:9443"),
            ("::1".into(), 9443, Transport::Auto)
        );
        assert_eq!(
            parsed("tls://[fe80::1]"),
            ("fe80::1".into(), DEFAULT_PORT, Transport::Tcp)
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "https://localhost:8443",
            "quic://[::1]:9443",
            "tls://10.0.0.1:1",
        ] {
            let u = BrokerUrl::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(s.parse::<BrokerUrl>().unwrap(), u);
        }
        assert_eq!(endpoint("::1", 1), "[::1]:1");
        assert_eq!(endpoint("a.b", 2), "a.b:2");
    }

    #[test]
    fn bad_urls_are_refused() {
        let kind = |s: &str| match BrokerUrl::parse(s) {
            Err(NetError::Url { url, source }) => {
                assert_eq!(url, s);
                source
            }
            other => panic!("{s}: {other:?}"),
        };
        assert!(matches!(kind("http://localhost:8443"), UrlError::UnknownScheme(s) if s == "http"));
        assert!(matches!(
            kind("ftp://localhost"),
            UrlError::UnknownScheme(_)
        ));
        assert!(matches!(kind("localhost:8443"), UrlError::UnknownScheme(_)));
        assert!(matches!(kind("broker"), UrlError::Parse(_)));
        assert!(matches!(kind(""), UrlError::Parse(_)));
        assert!(matches!(kind("https://[::1:8443"), UrlError::Parse(_)));
        assert!(matches!(kind("https://host:99999"), UrlError::Parse(_)));
        assert!(matches!(kind("quic:///path"), UrlError::NoHost));
        assert!(matches!(kind("tls:host"), UrlError::NoHost));
    }
}

//! Command-line options shared by the FEM programs (feature `cli`): those
//! of fem-net, [`ConnectArgs`] for the broker connection (with
//! [`TrustArgs`] for its certificate), and [`connect_retrying`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
pub use fem_net::cli::{LogArgs, LogFormat, TransportArg, host_name, shutdown_signal};

use crate::{AgentBuilder, Client, NetError, Options, SdkError, Transport, Trust};

/// How to trust the broker's certificate: `--ca`, `--pin` or `--insecure`.
#[derive(Clone, Debug, Args)]
pub struct TrustArgs {
    /// Trust the broker certificate issued by this CA (PEM file).
    #[arg(long, env = "FEM_CA")]
    pub ca: Option<PathBuf>,
    /// Trust the broker certificate with this SHA-256 fingerprint (hex).
    #[arg(long, env = "FEM_PIN")]
    pub pin: Option<String>,
    /// Do not verify the broker certificate (development only).
    #[arg(long, env = "FEM_INSECURE")]
    pub insecure: bool,
}

impl TrustArgs {
    /// The trust the options ask for.
    ///
    /// # Errors
    /// As [`Trust::from_options`]: conflicting options or a malformed pin.
    pub fn trust(&self) -> Result<Trust, NetError> {
        Trust::from_options(self.ca.clone(), self.pin.as_deref(), self.insecure)
    }
}

/// Broker connection options: URL and certificate trust.
#[derive(Clone, Debug, Args)]
pub struct ConnectArgs {
    /// Broker URL (https://host:8443; quic:// or tls:// force a transport).
    #[arg(long, env = "FEM_BROKER_URL", default_value = "https://localhost:8443")]
    pub broker: String,
    /// The broker's certificate.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Transport.
    #[arg(long, env = "FEM_TRANSPORT", value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Heartbeat interval.
    #[arg(long, env = "FEM_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Grant file (from `fem trust grant`), presented to brokers with a trust anchor.
    #[arg(long, env = "FEM_GRANT")]
    pub grant: Option<PathBuf>,
    /// Operator public key file: callers' grants must verify against it (repeatable).
    #[arg(long = "trust-anchor", env = "FEM_TRUST_ANCHOR", value_delimiter = ',')]
    pub trust_anchor: Vec<PathBuf>,
}

impl ConnectArgs {
    /// Connection options from the arguments.
    ///
    /// # Errors
    /// [`SdkError::Net`] for a bad URL, conflicting trust options or a
    /// malformed pin.
    pub fn options(&self) -> Result<Options, SdkError> {
        let trust = self.trust.trust()?;
        // Auto leaves the choice to the URL's scheme.
        let transport = match self.transport {
            TransportArg::Auto => None,
            t => Some(Transport::from(t)),
        };
        let mut o = Options::new(&self.broker)?
            .trust(trust)
            .heartbeat(self.heartbeat);
        if let Some(t) = transport {
            o = o.transport(t);
        }
        if let Some(p) = &self.grant {
            let text = std::fs::read_to_string(p)
                .map_err(|e| SdkError::Config(format!("--grant {}: {e}", p.display())))?;
            let g = fem_proto::SignedGrant::from_text(&text)
                .map_err(|e| SdkError::Config(format!("--grant {}: {e}", p.display())))?;
            o = o.grant(g);
        }
        let mut anchors = Vec::new();
        for p in &self.trust_anchor {
            anchors.push(crate::keys::load_public_key(p)?);
        }
        if !anchors.is_empty() {
            o = o.trust_anchors(anchors);
        }
        Ok(o)
    }
}

/// Connects `agent`, retrying until a broker accepts it (it may start after
/// the program): 250 ms after the first failure, doubled up to 30 s, each
/// failure logged as a warning.
///
/// # Errors
/// The first error that retrying cannot mend ([`SdkError::is_config`]).
pub async fn connect_retrying(agent: AgentBuilder, opts: &Options) -> Result<Client, SdkError> {
    let mut backoff = Duration::from_millis(250);
    loop {
        match agent.clone().connect(opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if e.is_config() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot register yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Parses the command line of `A`, then, when `config` names a file, lays
/// it over the result with `fill` (see [`ConfigOverlay`]; its unknown keys
/// are refused).
///
/// # Errors
/// [`SdkError::Config`] for the file; clap exits on bad flags, as usual.
pub fn parse_with_config<A: clap::Parser>(
    config: impl FnOnce(&A) -> Option<PathBuf>,
    fill: impl FnOnce(&mut A, &mut ConfigOverlay<'_>) -> Result<(), SdkError>,
) -> Result<A, SdkError> {
    let matches = A::command().get_matches();
    let mut args = A::from_arg_matches(&matches).map_err(|e| SdkError::Config(e.to_string()))?;
    let Some(path) = config(&args) else {
        return Ok(args);
    };
    let mut overlay = ConfigOverlay::load(&matches, &path)?;
    fill(&mut args, &mut overlay)?;
    overlay.finish()?;
    Ok(args)
}

/// A `--config` YAML file laid over parsed arguments: each key (a flag's
/// name in snake_case) fills in what neither the flag nor its variable gave.
/// Keys nobody takes are an error, so a typo does not pass silently.
#[derive(Debug)]
pub struct ConfigOverlay<'m> {
    matches: &'m clap::ArgMatches,
    path: PathBuf,
    map: serde_yaml_ng::Mapping,
}

impl<'m> ConfigOverlay<'m> {
    /// Reads the file.
    ///
    /// # Errors
    /// [`SdkError::Config`] when it cannot be read or is not a YAML mapping.
    pub fn load(matches: &'m clap::ArgMatches, path: &std::path::Path) -> Result<Self, SdkError> {
        let bad = |e: &dyn std::fmt::Display| {
            SdkError::Config(format!("--config {}: {e}", path.display()))
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
        let map: Option<serde_yaml_ng::Mapping> =
            serde_yaml_ng::from_str(&text).map_err(|e| bad(&e))?;
        Ok(Self {
            matches,
            path: path.to_owned(),
            map: map.unwrap_or_default(),
        })
    }

    fn error(&self, key: &str, e: impl std::fmt::Display) -> SdkError {
        SdkError::Config(format!("--config {}: {key}: {e}", self.path.display()))
    }

    /// The file's value for `key` when the command line and the environment
    /// left the flag `key` unset.
    fn value<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, SdkError> {
        use clap::parser::ValueSource;
        let Some(v) = self.map.remove(key) else {
            return Ok(None);
        };
        let given = matches!(
            self.matches.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if given {
            return Ok(None);
        }
        serde_yaml_ng::from_value(v)
            .map(Some)
            .map_err(|e| self.error(key, e))
    }

    /// Fills `field` from `key`.
    ///
    /// # Errors
    /// [`SdkError::Config`] when the value has the wrong type.
    pub fn take<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        field: &mut T,
    ) -> Result<(), SdkError> {
        if let Some(v) = self.value(key)? {
            *field = v;
        }
        Ok(())
    }

    /// Fills an optional `field` from `key`.
    ///
    /// # Errors
    /// As [`Self::take`].
    pub fn take_opt<T: serde::de::DeserializeOwned>(
        &mut self,
        key: &str,
        field: &mut Option<T>,
    ) -> Result<(), SdkError> {
        if let Some(v) = self.value(key)? {
            *field = Some(v);
        }
        Ok(())
    }

    /// Fills a duration `field` from `key` (text such as `30s`).
    ///
    /// # Errors
    /// As [`Self::take`], or for text that is not a duration.
    pub fn take_duration(&mut self, key: &str, field: &mut Duration) -> Result<(), SdkError> {
        if let Some(v) = self.value::<String>(key)? {
            *field = humantime::parse_duration(&v).map_err(|e| self.error(key, e))?;
        }
        Ok(())
    }

    /// The connection settings: broker, ca, pin, insecure, transport,
    /// heartbeat, grant, trust_anchor.
    ///
    /// # Errors
    /// As [`Self::take`].
    pub fn connection(&mut self, c: &mut ConnectArgs) -> Result<(), SdkError> {
        self.take("broker", &mut c.broker)?;
        self.take_opt("ca", &mut c.trust.ca)?;
        self.take_opt("pin", &mut c.trust.pin)?;
        self.take("insecure", &mut c.trust.insecure)?;
        self.take("transport", &mut c.transport)?;
        self.take_duration("heartbeat", &mut c.heartbeat)?;
        self.take_opt("grant", &mut c.grant)?;
        self.take("trust_anchor", &mut c.trust_anchor)
    }

    /// The logging settings: log_level, log_format.
    ///
    /// # Errors
    /// As [`Self::take`].
    pub fn log(&mut self, l: &mut LogArgs) -> Result<(), SdkError> {
        self.take_opt("log_level", &mut l.log_level)?;
        self.take_opt("log_format", &mut l.log_format)
    }

    /// Ends the overlay.
    ///
    /// # Errors
    /// [`SdkError::Config`] naming the keys nobody took.
    pub fn finish(self) -> Result<(), SdkError> {
        if self.map.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = self
            .map
            .keys()
            .map(|k| k.as_str().map_or_else(|| format!("{k:?}"), str::to_owned))
            .collect();
        Err(SdkError::Config(format!(
            "--config {}: unknown settings: {}",
            self.path.display(),
            keys.join(", ")
        )))
    }
}

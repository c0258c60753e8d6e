//! Command-line handling shared by the examples (no argument-parsing crate,
//! so they build without the `cli` feature).

use std::path::PathBuf;

use fem_agent_sdk::proto::{AgentId, SigningKey};
use fem_agent_sdk::{Options, Trust, keys};

/// Where the example connects, and as whom.
#[derive(Debug)]
pub(crate) struct Args {
    /// Broker URL (`--broker`, FEM_BROKER_URL).
    pub(crate) broker: String,
    /// CA certificate of the broker (`--ca`, FEM_CA); system roots without it.
    pub(crate) ca: Option<PathBuf>,
    /// Agent id (`--id`, FEM_AGENT_ID); derived from the key without it.
    pub(crate) id: Option<String>,
    /// Key file (`--key`, FEM_KEY), created when missing; a fresh key without it.
    pub(crate) key: Option<PathBuf>,
}

impl Args {
    /// Reads `--broker`, `--ca`, `--id` and `--key`, each falling back to its
    /// variable.
    pub(crate) fn parse() -> Result<Self, String> {
        let mut a = Self {
            broker: env("FEM_BROKER_URL").unwrap_or_else(|| "https://localhost:8443".into()),
            ca: env("FEM_CA").map(PathBuf::from),
            id: env("FEM_AGENT_ID"),
            key: env("FEM_KEY").map(PathBuf::from),
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--broker" => a.broker = value,
                "--ca" => a.ca = Some(value.into()),
                "--id" => a.id = Some(value),
                "--key" => a.key = Some(value.into()),
                _ => {
                    return Err(format!(
                        "unknown option {flag} (--broker, --ca, --id, --key)"
                    ));
                }
            }
        }
        Ok(a)
    }

    /// The agent id and key: `--id` or `PREFIX-` and the start of the
    /// public key; the key from `--key` or a fresh one.
    pub(crate) fn identity(
        &self,
        prefix: &str,
    ) -> Result<(AgentId, SigningKey), Box<dyn std::error::Error>> {
        let key = match &self.key {
            Some(path) => keys::load_or_generate_key(path)?,
            None => SigningKey::generate(),
        };
        let id = match &self.id {
            Some(id) => AgentId::new(id.as_str())?,
            None => AgentId::new(format!("{prefix}-{}", &key.public_key().to_string()[..12]))?,
        };
        Ok((id, key))
    }

    /// Connection options: the URL, and the CA when given.
    pub(crate) fn options(&self) -> Result<Options, fem_agent_sdk::SdkError> {
        let trust = self.ca.clone().map_or(Trust::System, Trust::CaFile);
        Ok(Options::new(&self.broker)?.trust(trust))
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

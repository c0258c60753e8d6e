//! `fem trust`: operator keys, issuer and agent grants, and their display.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use fem_agent_sdk::keys;
use fem_proto::grant::RateLimit;
use fem_proto::{
    CallRule, CapabilityPattern, Grant, IdPattern, Revocation, Role, SignedGrant, SignedRevocation,
};

/// `fem trust ...`
#[derive(Debug, Subcommand)]
pub(crate) enum TrustCmd {
    /// Create an operator key pair: DIR/operator.key (0600) and DIR/operator.pub.
    Init {
        /// Directory to create the files in.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a grant that lets an issuer key sign agent grants within a namespace of ids.
    Issuer {
        /// The signing key (the operator's).
        #[arg(long)]
        key: PathBuf,
        /// The issuer's public key file.
        #[arg(long)]
        subject: PathBuf,
        /// Agent id patterns the issuer may grant (e.g. 'team-a-*'; comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        namespace: Vec<String>,
        /// Lifetime.
        #[arg(long, default_value = "720h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Grant file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue an agent (or caller) grant bound to one public key.
    Grant {
        /// The signing key: the operator's, an issuer's (with --issuer-grant), or the
        /// holder of a delegable grant (with --issuer-grant naming that grant).
        #[arg(long)]
        key: PathBuf,
        /// The grant of --key when it is not a trust anchor (issuer or delegable grant).
        #[arg(long)]
        issuer_grant: Option<PathBuf>,
        /// The public key file the grant is bound to.
        #[arg(long)]
        subject: PathBuf,
        /// What the key is: an agent (or caller), or a broker of the federation.
        #[arg(long, value_enum, default_value = "agent")]
        role: RoleArg,
        /// Brokers: agent id patterns the broker may advertise to its peers.
        #[arg(long, value_delimiter = ',')]
        advertise: Vec<String>,
        /// Agent id patterns the key may register ('coder-*'), or a broker's own id (comma-separated).
        #[arg(long = "register-id", value_delimiter = ',')]
        register_id: Vec<String>,
        /// Capabilities, tools and event topics it may offer (comma-separated patterns).
        #[arg(long, value_delimiter = ',')]
        offer: Vec<String>,
        /// What it may call: TOOL or TOOL@AGENT-PATTERN (comma-separated).
        #[arg(long, value_delimiter = ',')]
        call: Vec<String>,
        /// What it may never call (wins over --call), same form.
        #[arg(long, value_delimiter = ',')]
        deny: Vec<String>,
        /// Calls per second at the entry broker, with a burst: N or N/BURST.
        #[arg(long)]
        rate: Option<String>,
        /// May act as operator (revoke others, operator views).
        #[arg(long)]
        operator: bool,
        /// May sign narrower grants for other keys (attenuation).
        #[arg(long)]
        delegate: bool,
        /// Lifetime.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Grant file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a signed revocation: every grant of a key, one grant (with every
    /// grant signed under it), or a key's grants issued before a time.
    Revoke {
        /// The operator key (a trust anchor), or the key of an operator grant (with --grant).
        #[arg(long)]
        key: PathBuf,
        /// The operator grant of --key, when --key is not a trust anchor.
        #[arg(long)]
        grant: Option<PathBuf>,
        /// Public key file whose grants are revoked.
        #[arg(long, required_unless_present = "grant_id")]
        subject: Option<PathBuf>,
        /// The id of one grant (hex, as `fem trust show` prints it).
        #[arg(long)]
        grant_id: Option<String>,
        /// With --subject: only grants issued before this time (RFC 3339, e.g. 2026-11-26T12:00:00Z).
        #[arg(long, requires = "subject")]
        before: Option<String>,
        /// Revocation file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Deliver a revocation to a broker (it applies it and passes it to its peers).
    Push {
        #[command(flatten)]
        conn: fem_agent_sdk::cli::ConnectArgs,
        /// The revocation file.
        file: PathBuf,
    },
    /// Print a grant or revocation file in readable form (and verify it if --anchor is given).
    Show {
        /// The grant file.
        file: PathBuf,
        /// Operator public key file to verify the chain against.
        #[arg(long)]
        anchor: Vec<PathBuf>,
    },
}

/// `--role` of `fem trust grant`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum RoleArg {
    /// An agent or caller.
    Agent,
    /// A federation broker.
    Broker,
}

/// Runs a `fem trust` command.
pub(crate) async fn run(cmd: TrustCmd) -> anyhow::Result<()> {
    match cmd {
        TrustCmd::Revoke {
            key,
            grant,
            subject,
            grant_id,
            before,
            out,
        } => {
            let grant_id = grant_id
                .map(|h| {
                    let mut b = [0u8; 16];
                    hex::decode_to_slice(h.trim(), &mut b)
                        .map(|()| b)
                        .context("--grant-id needs the 32 hex digits of a grant id")
                })
                .transpose()?;
            let before_ms = before
                .map(|t| {
                    let at = humantime::parse_rfc3339_weak(&t)
                        .with_context(|| format!("--before {t:?}"))?;
                    let ms = at
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_err(|_| anyhow::anyhow!("--before is before 1970"))?
                        .as_millis();
                    Ok::<u64, anyhow::Error>(u64::try_from(ms).unwrap_or(u64::MAX))
                })
                .transpose()?;
            let mut id = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
            let r = Revocation {
                version: 1,
                id,
                issued_ms: fem_proto::now_ms(),
                subject: subject.as_deref().map(keys::load_public_key).transpose()?,
                grant_id,
                before_ms,
            };
            let operator = grant.as_deref().map(read_grant).transpose()?;
            let signed = r.sign(&keys::load_key(&key)?, operator)?;
            create_new(&out, &signed.to_text()?)?;
            println!("revocation written to {}", out.display());
            Ok(())
        }
        TrustCmd::Push { conn, file } => push(&conn, &file).await,
        TrustCmd::Init { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
            let key = fem_proto::SigningKey::generate();
            let secret = out.join("operator.key");
            keys::save_key(&secret, &key)?;
            keys::save_public_key(&out.join("operator.pub"), &key.public_key())?;
            println!(
                "operator key {} written to {} (keep it offline) and {}",
                key.public_key().fingerprint(),
                secret.display(),
                out.join("operator.pub").display()
            );
            Ok(())
        }
        TrustCmd::Issuer {
            key,
            subject,
            namespace,
            ttl,
            out,
        } => {
            let g = Grant {
                role: Role::Issuer,
                register: id_patterns(&namespace)?,
                ..base(&subject, ttl)?
            };
            write_grant(&out, &g.sign(&keys::load_key(&key)?, None)?)
        }
        TrustCmd::Grant {
            key,
            issuer_grant,
            subject,
            role,
            advertise,
            register_id,
            offer,
            call,
            deny,
            rate,
            operator,
            delegate,
            ttl,
            out,
        } => {
            let parent = issuer_grant.as_deref().map(read_grant).transpose()?;
            let rules = |v: &[String]| -> anyhow::Result<Vec<CallRule>> {
                v.iter()
                    .map(|s| CallRule::parse(s).with_context(|| format!("call rule {s:?}")))
                    .collect()
            };
            let g = Grant {
                role: match role {
                    RoleArg::Agent => Role::Agent,
                    RoleArg::Broker => Role::Broker,
                },
                offer_ids: id_patterns(&advertise)?,
                register: id_patterns(&register_id)?,
                offer: offer
                    .iter()
                    .map(|s| {
                        CapabilityPattern::new(s.as_str()).with_context(|| format!("--offer {s:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                call: rules(&call)?,
                deny: rules(&deny)?,
                rate: rate.as_deref().map(parse_rate).transpose()?,
                operator,
                delegate,
                ..base(&subject, ttl)?
            };
            let signed = g.sign(&keys::load_key(&key)?, parent)?;
            write_grant(&out, &signed)
        }
        TrustCmd::Show { file, anchor } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let mut anchors = Vec::new();
            for a in &anchor {
                anchors.push(keys::load_public_key(a)?);
            }
            if let Ok(r) = SignedRevocation::from_text(&text) {
                let d = r.decode()?;
                println!("revocation {}", hex::encode(d.id));
                println!("  signed by: {}", r.signer);
                println!("  issued:    {} ms", d.issued_ms);
                if let Some(k) = d.subject {
                    println!("  key:       {k}");
                }
                if let Some(g) = d.grant_id {
                    println!("  grant:     {}", hex::encode(g));
                }
                if let Some(t) = d.before_ms {
                    println!("  before:    {t} ms");
                }
                if r.grant.is_some() {
                    println!("  signed by the holder of an operator grant");
                }
                if !anchors.is_empty() {
                    r.verify(&anchors, fem_proto::now_ms())
                        .map_err(|e| anyhow::anyhow!("does not verify: {e}"))?;
                    println!("verified against the given anchor(s)");
                }
                return Ok(());
            }
            let signed = read_grant(&file)?;
            for (i, link) in signed.chain.iter().enumerate() {
                let g = SignedGrant {
                    chain: vec![link.clone()],
                }
                .decode()?;
                let label = if i == 0 { "grant" } else { "signed under" };
                println!("{label} {}", hex::encode(g.id));
                print_grant(&g, &link.signer);
            }
            if !anchors.is_empty() {
                match signed.verify(&anchors, fem_proto::now_ms()) {
                    Ok(_) => println!("verified against the given anchor(s)"),
                    Err(e) => anyhow::bail!("does not verify: {e}"),
                }
            }
            Ok(())
        }
    }
}

fn base(subject: &Path, ttl: Duration) -> anyhow::Result<Grant> {
    let now = fem_proto::now_ms();
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id);
    Ok(Grant {
        version: 1,
        id,
        subject: keys::load_public_key(subject)?,
        role: Role::Agent,
        issued_ms: now,
        expires_ms: now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        register: Vec::new(),
        offer: Vec::new(),
        offer_ids: Vec::new(),
        call: Vec::new(),
        deny: Vec::new(),
        rate: None,
        operator: false,
        delegate: false,
    })
}

fn id_patterns(v: &[String]) -> anyhow::Result<Vec<IdPattern>> {
    v.iter()
        .map(|s| IdPattern::new(s.as_str()).with_context(|| format!("id pattern {s:?}")))
        .collect()
}

fn parse_rate(s: &str) -> anyhow::Result<RateLimit> {
    let (n, b) = s.split_once('/').unwrap_or((s, s));
    let per_sec: u32 = n.trim().parse().with_context(|| format!("--rate {s:?}"))?;
    let burst: u32 = b.trim().parse().with_context(|| format!("--rate {s:?}"))?;
    anyhow::ensure!(per_sec > 0 && burst > 0, "--rate needs positive numbers");
    Ok(RateLimit { per_sec, burst })
}

/// Reads a grant file.
pub(crate) fn read_grant(path: &Path) -> anyhow::Result<SignedGrant> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    SignedGrant::from_text(&text).with_context(|| format!("{}", path.display()))
}

/// Creates a grant file.
fn write_grant(path: &Path, g: &SignedGrant) -> anyhow::Result<()> {
    create_new(path, &g.to_text()?)?;
    println!("grant written to {}", path.display());
    Ok(())
}

/// Writes a new file; never overwrites and never follows a symlink
/// (create_new fails on any existing path, a dangling link included).
fn create_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("{} (trust files are never overwritten)", path.display()))?;
    writeln!(f, "{text}").with_context(|| format!("{}", path.display()))
}

/// POSTs a revocation to the broker's `/v1/revocations` over HTTPS.
async fn push(conn: &fem_agent_sdk::cli::ConnectArgs, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    SignedRevocation::from_text(&text).with_context(|| format!("{}", file.display()))?;
    let (status, body) = crate::https::request(
        conn,
        "POST",
        "/v1/revocations",
        &[("Content-Type", "text/plain".to_owned())],
        text.trim(),
    )
    .await?;
    anyhow::ensure!(status == 200, "broker answered {status}: {body}");
    println!("{body}");
    Ok(())
}

fn print_grant(g: &Grant, signer: &fem_proto::PublicKey) {
    let join = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            v.join(", ")
        }
    };
    println!("  role:      {:?}", g.role);
    println!("  subject:   {}", g.subject);
    println!("  signed by: {signer}");
    println!(
        "  issued:    {} ms, expires {} ms",
        g.issued_ms, g.expires_ms
    );
    println!(
        "  ids:       {}",
        join(g.register.iter().map(ToString::to_string).collect())
    );
    println!(
        "  offer:     {}",
        join(g.offer.iter().map(ToString::to_string).collect())
    );
    if g.role == Role::Broker {
        println!(
            "  advertise: {}",
            join(g.offer_ids.iter().map(ToString::to_string).collect())
        );
    }
    println!(
        "  call:      {}",
        join(g.call.iter().map(ToString::to_string).collect())
    );
    println!(
        "  deny:      {}",
        join(g.deny.iter().map(ToString::to_string).collect())
    );
    if let Some(r) = g.rate {
        println!("  rate:      {}/s, burst {}", r.per_sec, r.burst);
    }
    println!("  operator:  {}, delegate: {}", g.operator, g.delegate);
}

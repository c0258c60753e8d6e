//! The sandbox behind fem-coder's tools: `shell.run`, `code.execute` and
//! `file.read`.
//!
//! Each tool function takes the JSON parameters of a tool call and returns the
//! JSON result, or a [`SandboxError`] whose [`SandboxError::code`] is the
//! protocol error code to answer with. Everything is decided by a [`Policy`]
//! built once at startup from [`PolicyOptions`].
//!
//! Two things keep a caller in check:
//! - the policy: only allowed programs start, by the absolute path resolved
//!   at startup, with arguments passed as a vector (no shell unless `sh` is
//!   allowed and the caller asks for `command`); `file.read` and `cwd` are
//!   confined to the allowed roots after resolving symlinks and `..`, and
//!   `file.read` refuses the agent's key by inode (hard links too); output is
//!   capped and a deadline ends every call;
//! - the [`isolation`] of every child, in layers applied before exec and
//!   probed at start (base, Landlock, seccomp, namespaces): what an allowed
//!   program does is bounded there, not by the allow-list, since allowed
//!   programs (sh, python3, env, git) can start any other.
//!
//! Every result of `shell.run` and `code.execute` carries a `sandbox` object
//! with the level reached and what each layer enforced for that call.

mod exec;
mod fs;
pub mod isolation;

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use fem_proto::ErrorCode;
use isolation::{Isolation, IsolationOptions, Limits};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

/// Tool name of [`shell_run`].
pub const SHELL_RUN: &str = "shell.run";
/// Tool name of [`code_execute`].
pub const CODE_EXECUTE: &str = "code.execute";
/// Tool name of [`file_read`].
pub const FILE_READ: &str = "file.read";

/// `PATH` given to children, and the directories searched (in order) when
/// allowed program names are resolved at startup.
pub const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Programs allowed by [`PolicyOptions::default`].
pub const DEFAULT_PROGRAMS: &[&str] = &[
    "echo", "ls", "cat", "git", "python3", "sh", "pwd", "wc", "head", "tail", "grep", "uname",
    "date", "env", "true", "false",
];

/// Largest `code` accepted by [`code_execute`].
pub const MAX_CODE_BYTES: usize = 1024 * 1024;

/// Largest `stdin` accepted by [`shell_run`] and [`code_execute`].
pub const MAX_STDIN_BYTES: usize = 8 * 1024 * 1024;

const MIB: u64 = 1024 * 1024;

/// Raw sandbox options, as given on the command line. `Default` gives the demo
/// defaults; [`Policy::new`] validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOptions {
    /// Directories `file.read` and `cwd` may reach (`--allow-path`, repeatable).
    /// Relative entries are relative to the agent's current directory. Empty
    /// means `[work_dir]`. Default: the current directory.
    pub allow_paths: Vec<PathBuf>,
    /// Programs that may be run (`--allow-program`, repeatable): bare names,
    /// looked up in [`SANDBOX_PATH`], or absolute paths. `sh` also enables
    /// `shell.run` with `command` and `code.execute` with `sh`; `python3`
    /// enables `code.execute` with `python`. Default: [`DEFAULT_PROGRAMS`].
    pub allow_programs: Vec<String>,
    /// Default cwd of `shell.run`, base of relative paths and the children's
    /// `HOME`; must lie inside an allowed root. Default: the current directory.
    pub work_dir: PathBuf,
    /// Longest a call may run; a call's `timeout_ms` can only lower it.
    /// Default: 30 s.
    pub timeout: Duration,
    /// Cap on captured stdout and on captured stderr (each). Default: 1 MiB.
    pub max_output_bytes: usize,
    /// Cap on the bytes `file.read` returns. Default: 1 MiB.
    pub max_file_bytes: u64,
    /// `RLIMIT_CPU` of children, in seconds. Default: 30.
    pub cpu_seconds: u64,
    /// `RLIMIT_AS` (address space) of children, in bytes. Default: 1 GiB.
    pub memory_bytes: u64,
    /// `RLIMIT_NPROC` of children. Default: 256. Caveat: the kernel counts all
    /// processes and threads of the child's real uid, including the agent and
    /// anything else that user runs, and does not enforce it for root.
    pub max_processes: u64,
    /// The isolation layers' settings. Default: every layer available, no
    /// network, no protected file.
    pub isolation: IsolationOptions,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        let work_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Self {
            allow_paths: vec![work_dir.clone()],
            allow_programs: DEFAULT_PROGRAMS.iter().map(|&p| p.to_owned()).collect(),
            work_dir,
            timeout: Duration::from_secs(30),
            max_output_bytes: 1024 * 1024,
            max_file_bytes: MIB,
            cpu_seconds: 30,
            memory_bytes: 1024 * MIB,
            max_processes: 256,
            isolation: IsolationOptions::default(),
        }
    }
}

/// A validated sandbox policy: canonical roots and work dir, allowed programs
/// resolved to absolute paths, and the limits.
#[derive(Debug, Clone)]
pub struct Policy {
    roots: Vec<PathBuf>,
    work_dir: PathBuf,
    /// Allowed name (as configured) -> absolute path to execute.
    programs: BTreeMap<String, PathBuf>,
    timeout: Duration,
    max_output_bytes: usize,
    max_file_bytes: u64,
    cpu_seconds: u64,
    memory_bytes: u64,
    max_processes: u64,
    limits: Limits,
    isolation: Arc<Isolation>,
}

impl Policy {
    /// Validates `opts`.
    ///
    /// Allowed programs that cannot be found are dropped with a warning. The
    /// isolation layers are probed here (see [`isolation`]), with test
    /// children.
    ///
    /// Errors: [`SandboxError::Io`] if the work dir or an allowed path cannot
    /// be canonicalized (e.g. it does not exist); [`SandboxError::InvalidPolicy`]
    /// if one of them is not a directory, the work dir is outside every
    /// allowed path, the timeout or a resource limit is zero, or a protected
    /// file lies where children could read it; [`SandboxError::Internal`] if
    /// not even the base layer can start a child.
    pub fn new(opts: PolicyOptions) -> Result<Self, SandboxError> {
        let invalid = |msg: &str| Err(SandboxError::InvalidPolicy(msg.to_owned()));
        if opts.timeout.is_zero() {
            return invalid("timeout must be greater than zero");
        }
        if opts.cpu_seconds == 0 || opts.memory_bytes == 0 || opts.max_processes == 0 {
            return invalid(
                "cpu_seconds, memory_bytes and max_processes must be greater than zero",
            );
        }
        let work_dir = canonical_dir(&opts.work_dir, "work dir")?;
        let raw_roots = if opts.allow_paths.is_empty() {
            vec![work_dir.clone()]
        } else {
            opts.allow_paths
        };
        let mut roots: Vec<PathBuf> = Vec::with_capacity(raw_roots.len());
        for raw in &raw_roots {
            let root = canonical_dir(raw, "allowed path")?;
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        if !fs::within_roots(&roots, &work_dir) {
            return Err(SandboxError::InvalidPolicy(format!(
                "work dir {} is not inside any allowed path",
                work_dir.display()
            )));
        }
        let mut programs = BTreeMap::new();
        for name in &opts.allow_programs {
            if programs.contains_key(name) {
                continue;
            }
            match resolve_program(name) {
                Some(path) => {
                    programs.insert(name.clone(), path);
                }
                None => tracing::warn!(
                    program = %name,
                    search_path = SANDBOX_PATH,
                    "allowed program not found (or not an executable file); dropping it"
                ),
            }
        }
        let limits = Limits::for_options(opts.cpu_seconds, opts.memory_bytes, opts.max_processes)?;
        let isolation = Isolation::probe(&opts.isolation, &roots, limits)?;
        Ok(Self {
            roots,
            work_dir,
            programs,
            timeout: opts.timeout,
            max_output_bytes: opts.max_output_bytes,
            max_file_bytes: opts.max_file_bytes,
            cpu_seconds: opts.cpu_seconds,
            memory_bytes: opts.memory_bytes,
            max_processes: opts.max_processes,
            limits,
            isolation: Arc::new(isolation),
        })
    }

    /// The probed isolation of children.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// One line for the startup log: roots, programs, shell, limits.
    pub fn describe(&self) -> String {
        let roots: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
        let programs: Vec<&str> = self.programs.keys().map(String::as_str).collect();
        format!(
            "sandbox: roots=[{}] work_dir={} programs=[{}] shell={} timeout={}ms \
             max_output={}B/stream max_file={}B cpu={}s memory={}B nproc={}",
            roots.join(", "),
            self.work_dir.display(),
            programs.join(", "),
            if self.allows_shell() {
                "allowed"
            } else {
                "denied"
            },
            self.timeout.as_millis(),
            self.max_output_bytes,
            self.max_file_bytes,
            self.cpu_seconds,
            self.memory_bytes,
            self.max_processes,
        )
    }

    /// The canonical work dir.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The canonical allowed roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// The allowed programs that were found: configured name and absolute path.
    pub fn programs(&self) -> impl Iterator<Item = (&str, &Path)> {
        self.programs
            .iter()
            .map(|(name, path)| (name.as_str(), path.as_path()))
    }

    /// Whether `shell.run` accepts `command` (i.e. `sh` is allowed).
    pub fn allows_shell(&self) -> bool {
        self.programs.contains_key("sh")
    }

    /// The per-call time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The absolute path to run for `argv0`: an allowed name, or exactly the
    /// resolved path of an allowed program. `None` if not allowed.
    pub fn program(&self, argv0: &str) -> Option<&Path> {
        if let Some(path) = self.programs.get(argv0) {
            return Some(path);
        }
        let wanted = Path::new(argv0);
        self.programs
            .values()
            .find(|p| p.as_path() == wanted)
            .map(PathBuf::as_path)
    }

    fn program_names(&self) -> String {
        self.programs
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `timeout_ms` 0 is rejected; larger values are clamped to the policy.
    fn effective_timeout(&self, timeout_ms: Option<u64>) -> Result<Duration, SandboxError> {
        match timeout_ms {
            None => Ok(self.timeout),
            Some(0) => Err(SandboxError::BadRequest(
                "timeout_ms must be at least 1".to_owned(),
            )),
            Some(ms) => Ok(Duration::from_millis(ms).min(self.timeout)),
        }
    }
}

fn canonical_dir(raw: &Path, what: &str) -> Result<PathBuf, SandboxError> {
    let dir = std::fs::canonicalize(raw).map_err(|e| SandboxError::Io {
        context: format!("{what} {}", raw.display()),
        source: e,
    })?;
    if !dir.is_dir() {
        return Err(SandboxError::InvalidPolicy(format!(
            "{what} {} is not a directory",
            dir.display()
        )));
    }
    Ok(dir)
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A bare name is searched in [`SANDBOX_PATH`]; a name with a slash must be an
/// absolute path. The path is not canonicalized, so multi-call binaries that
/// dispatch on their name (busybox) keep working.
fn resolve_program(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('\0') {
        return None;
    }
    if name.contains('/') {
        let path = PathBuf::from(name);
        return (path.is_absolute() && is_executable_file(&path)).then_some(path);
    }
    SANDBOX_PATH
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| is_executable_file(candidate))
}

/// Appends to `buf` as much of `data` as fits in `cap` bytes, growing the
/// allocation no further than `cap`. Returns whether anything was dropped.
fn push_bounded(buf: &mut Vec<u8>, data: &[u8], cap: usize) -> bool {
    let room = cap.saturating_sub(buf.len());
    let take = data.len().min(room);
    if take > 0 {
        if buf.capacity() - buf.len() < take {
            let target = buf
                .capacity()
                .saturating_mul(2)
                .max(buf.len() + take)
                .min(cap);
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&data[..take]);
    }
    take < data.len()
}

/// Errors of the sandbox and its tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The policy refuses the request (program, shell, path outside roots).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The parameters are malformed or name something unusable.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// [`PolicyOptions`] are inconsistent (startup only).
    #[error("invalid sandbox policy: {0}")]
    InvalidPolicy(String),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A bug or an unexpected condition in the sandbox.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SandboxError {
    /// The protocol error code to report: `PermissionDenied`, `BadRequest`,
    /// or `Internal` for everything else.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::InvalidPolicy(_) | Self::Io { .. } | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShellRunParams {
    argv: Option<Vec<String>>,
    command: Option<String>,
    cwd: Option<String>,
    stdin: Option<String>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    network: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Language {
    Python,
    Sh,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeExecuteParams {
    language: Language,
    code: String,
    stdin: Option<String>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    network: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReadParams {
    path: String,
    max_bytes: Option<u64>,
}

fn parse_params<T: DeserializeOwned>(tool: &str, params: Value) -> Result<T, SandboxError> {
    if !params.is_object() {
        return Err(SandboxError::BadRequest(format!(
            "{tool} parameters must be a JSON object"
        )));
    }
    serde_json::from_value(params)
        .map_err(|e| SandboxError::BadRequest(format!("invalid {tool} parameters: {e}")))
}

fn check_stdin(stdin: Option<&String>) -> Result<(), SandboxError> {
    match stdin {
        Some(s) if s.len() > MAX_STDIN_BYTES => Err(SandboxError::BadRequest(format!(
            "stdin is larger than {MAX_STDIN_BYTES} bytes"
        ))),
        _ => Ok(()),
    }
}

/// A call may have the network only if it asks and the policy allows it.
fn check_network(policy: &Policy, network: bool) -> Result<(), SandboxError> {
    if network && !policy.isolation.allows_network() {
        return Err(SandboxError::PermissionDenied(
            "network access is not allowed by policy (fem-coder runs without --allow-network)"
                .to_owned(),
        ));
    }
    Ok(())
}

/// A fresh directory for one call (its TMPDIR; writable by the child).
fn call_dir(prefix: &str) -> Result<tempfile::TempDir, SandboxError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| SandboxError::Io {
            context: "creating a temporary directory".to_owned(),
            source: e,
        })
}

/// Removes a call's directory off the runtime (what the child left there
/// can take a while).
async fn remove_call_dir(dir: tempfile::TempDir) {
    let removal = tokio::task::spawn_blocking(move || dir.close()).await;
    if let Ok(Err(e)) | Err(e) = removal.map_err(io::Error::other) {
        tracing::warn!(error = %e, "removing a call's temporary directory failed");
    }
}

fn check_no_nul(what: &str, s: &str) -> Result<(), SandboxError> {
    if s.contains('\0') {
        return Err(SandboxError::BadRequest(format!(
            "{what} contains a NUL byte"
        )));
    }
    Ok(())
}

/// Runs a program (`argv`) or, if the policy allows `sh`, a shell command
/// (`command`). Params: `{"argv": [..] | "command": "..", "cwd"?, "stdin"?,
/// "timeout_ms"?, "network"?}`; see [`shell_run_schema`]. Result: `{"stdout",
/// "stderr", "exit_code", "signal", "timed_out", "truncated", "duration_ms",
/// "sandbox"}`. A timeout is not an error: it is reported with
/// `timed_out: true`. The child's TMPDIR is a fresh directory, removed after.
///
/// Errors: `BadRequest` for malformed params (unknown fields, both or neither
/// of argv/command, empty argv, `timeout_ms` 0, NUL bytes, oversized stdin, a
/// missing cwd); `PermissionDenied` for a program that is not allowed, a
/// command while `sh` is not allowed, or a cwd outside the roots; `Io` or
/// `Internal` if the process cannot be started or waited for.
pub async fn shell_run(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
    let p: ShellRunParams = parse_params(SHELL_RUN, params)?;
    let timeout = policy.effective_timeout(p.timeout_ms)?;
    check_stdin(p.stdin.as_ref())?;
    check_network(policy, p.network)?;
    let (program, args) = match (p.argv, p.command) {
        (Some(argv), None) => {
            let mut argv = argv.into_iter();
            let Some(argv0) = argv.next() else {
                return Err(SandboxError::BadRequest(
                    "argv must not be empty".to_owned(),
                ));
            };
            let args: Vec<String> = argv.collect();
            check_no_nul("argv", &argv0)?;
            for arg in &args {
                check_no_nul("argv", arg)?;
            }
            let Some(program) = policy.program(&argv0) else {
                return Err(SandboxError::PermissionDenied(format!(
                    "program `{argv0}` is not allowed by policy (allowed: {})",
                    policy.program_names()
                )));
            };
            (program.to_path_buf(), args)
        }
        (None, Some(command)) => {
            if command.trim().is_empty() {
                return Err(SandboxError::BadRequest(
                    "command must not be empty".to_owned(),
                ));
            }
            check_no_nul("command", &command)?;
            let Some(sh) = policy.program("sh") else {
                return Err(SandboxError::PermissionDenied(
                    "shell commands are not allowed by policy (`sh` is not an allowed \
                     program); pass `argv` instead"
                        .to_owned(),
                ));
            };
            (sh.to_path_buf(), vec!["-c".to_owned(), command])
        }
        (Some(_), Some(_)) => {
            return Err(SandboxError::BadRequest(
                "give exactly one of `argv` and `command`, not both".to_owned(),
            ));
        }
        (None, None) => {
            return Err(SandboxError::BadRequest(
                "one of `argv` or `command` is required".to_owned(),
            ));
        }
    };
    let cwd = match p.cwd {
        Some(raw) => fs::resolve_dir(policy, &raw).await?,
        None => policy.work_dir.clone(),
    };
    let tmp = call_dir(&isolation::call_dir_prefix(true))?;
    let spec = exec::Spec {
        program,
        args,
        cwd,
        stdin: p.stdin,
        timeout,
        tmpdir: tmp.path().to_path_buf(),
        tool: SHELL_RUN,
        network: p.network,
    };
    let result = exec::run(policy, spec).await;
    remove_call_dir(tmp).await;
    result
}

/// Runs a snippet of Python (`python3`) or shell (`sh`) code from a fresh
/// temporary directory, which is also its cwd and `TMPDIR` and is removed
/// afterwards. Params: `{"language": "python"|"sh", "code", "stdin"?,
/// "timeout_ms"?}`; see [`code_execute_schema`]. Result: as [`shell_run`].
///
/// Errors: `BadRequest` for malformed params or code over
/// [`MAX_CODE_BYTES`]; `PermissionDenied` if the interpreter is not an
/// allowed program or network is asked for without `--allow-network`; `Io`
/// if the temporary directory cannot be set up or the
/// interpreter cannot be started.
pub async fn code_execute(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
    let p: CodeExecuteParams = parse_params(CODE_EXECUTE, params)?;
    let timeout = policy.effective_timeout(p.timeout_ms)?;
    check_stdin(p.stdin.as_ref())?;
    check_network(policy, p.network)?;
    if p.code.len() > MAX_CODE_BYTES {
        return Err(SandboxError::BadRequest(format!(
            "code is larger than {MAX_CODE_BYTES} bytes"
        )));
    }
    let (language, interpreter, file_name) = match p.language {
        Language::Python => ("python", "python3", "main.py"),
        Language::Sh => ("sh", "sh", "main.sh"),
    };
    let Some(interpreter_path) = policy.program(interpreter) else {
        return Err(SandboxError::PermissionDenied(format!(
            "language `{language}` needs `{interpreter}`, which is not an allowed program"
        )));
    };
    let program = interpreter_path.to_path_buf();

    let dir = call_dir(&isolation::call_dir_prefix(false))?;
    let file = dir.path().join(file_name);
    tokio::fs::write(&file, p.code.as_bytes())
        .await
        .map_err(|e| SandboxError::Io {
            context: format!("writing {}", file.display()),
            source: e,
        })?;
    let spec = exec::Spec {
        program,
        args: vec![file.to_string_lossy().into_owned()],
        cwd: dir.path().to_path_buf(),
        stdin: p.stdin,
        timeout,
        tmpdir: dir.path().to_path_buf(),
        tool: CODE_EXECUTE,
        network: p.network,
    };
    let result = exec::run(policy, spec).await;
    remove_call_dir(dir).await;
    result
}

/// Reads a file inside the allowed roots. Params: `{"path", "max_bytes"?}`;
/// see [`file_read_schema`]. Relative paths are relative to the work dir.
/// Result: `{"path": canonical path, "size", "content", "encoding":
/// "utf8"|"base64", "truncated"}`; at most `min(max_bytes, max_file_bytes)`
/// bytes are read.
///
/// Errors: `BadRequest` for malformed params, a missing file or one that is
/// not a regular file; `PermissionDenied` if the path resolves (through
/// symlinks or `..`) outside the allowed roots, is unreadable, or is the
/// agent's key (by inode, so hard links too); `Io` or
/// `Internal` for read failures.
pub async fn file_read(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
    let p: FileReadParams = parse_params(FILE_READ, params)?;
    let limit = p
        .max_bytes
        .unwrap_or(policy.max_file_bytes)
        .min(policy.max_file_bytes);
    let path = fs::resolve_in_roots(policy, &p.path, "path").await?;
    let roots = policy.roots.clone();
    let read_path = path.clone();
    let isolation = Arc::clone(&policy.isolation);
    let content = tokio::task::spawn_blocking(move || {
        fs::read_bounded(&read_path, limit, &roots, &isolation)
    })
    .await
    .map_err(|e| SandboxError::Internal(format!("file read task failed: {e}")))??;
    let (text, encoding) = encode_content(content.bytes, content.truncated);
    tracing::info!(
        tool = FILE_READ,
        path = %path.display(),
        size = content.size,
        truncated = content.truncated,
        "file read"
    );
    Ok(json!({
        "path": path.to_string_lossy(),
        "size": content.size,
        "content": text,
        "encoding": encoding,
        "truncated": content.truncated,
    }))
}

/// UTF-8 when the bytes are valid UTF-8 (ignoring a character cut at the end
/// by truncation, which is dropped), standard base64 otherwise.
fn encode_content(mut bytes: Vec<u8>, truncated: bool) -> (String, &'static str) {
    let valid_len = match std::str::from_utf8(&bytes) {
        Ok(_) => Some(bytes.len()),
        Err(e) if truncated && e.error_len().is_none() => Some(e.valid_up_to()),
        Err(_) => None,
    };
    if let Some(len) = valid_len {
        bytes.truncate(len);
        match String::from_utf8(bytes) {
            Ok(text) => return (text, "utf8"),
            Err(e) => bytes = e.into_bytes(),
        }
    }
    (
        base64::engine::general_purpose::STANDARD.encode(&bytes),
        "base64",
    )
}

const SCHEMA_DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// JSON Schema (draft 2020-12) of the [`shell_run`] parameters.
pub fn shell_run_schema() -> Value {
    json!({
        "$schema": SCHEMA_DIALECT,
        "title": "shell.run parameters",
        "description": "Run an allowed program with arguments (argv, no shell), or a shell command line (command, only if the policy allows sh). Give exactly one of argv and command.",
        "type": "object",
        "properties": {
            "argv": {
                "description": "Program and arguments; argv[0] must be an allowed program name. Arguments are passed literally.",
                "type": "array",
                "items": { "type": "string" },
                "minItems": 1
            },
            "command": {
                "description": "Shell command line run with `sh -c`.",
                "type": "string",
                "minLength": 1
            },
            "cwd": {
                "description": "Working directory inside the allowed roots; relative to the work dir. Default: the work dir.",
                "type": "string",
                "minLength": 1
            },
            "stdin": {
                "description": "Data written to the program's standard input (default: empty).",
                "type": "string",
                "maxLength": MAX_STDIN_BYTES
            },
            "timeout_ms": {
                "description": "Time limit in milliseconds; larger values are clamped to the agent's limit.",
                "type": "integer",
                "minimum": 1
            },
            "network": {
                "description": "Ask for network access (refused unless the agent runs with --allow-network). Default: false.",
                "type": "boolean"
            }
        },
        "oneOf": [
            { "required": ["argv"] },
            { "required": ["command"] }
        ],
        "additionalProperties": false
    })
}

/// JSON Schema (draft 2020-12) of the [`code_execute`] parameters.
pub fn code_execute_schema() -> Value {
    json!({
        "$schema": SCHEMA_DIALECT,
        "title": "code.execute parameters",
        "description": "Run a Python or shell snippet in a fresh temporary directory.",
        "type": "object",
        "properties": {
            "language": {
                "description": "python runs python3, sh runs sh.",
                "enum": ["python", "sh"]
            },
            "code": {
                "description": "Source code of the program.",
                "type": "string",
                "maxLength": MAX_CODE_BYTES
            },
            "stdin": {
                "description": "Data written to the program's standard input (default: empty).",
                "type": "string",
                "maxLength": MAX_STDIN_BYTES
            },
            "timeout_ms": {
                "description": "Time limit in milliseconds; larger values are clamped to the agent's limit.",
                "type": "integer",
                "minimum": 1
            },
            "network": {
                "description": "Ask for network access (refused unless the agent runs with --allow-network). Default: false.",
                "type": "boolean"
            }
        },
        "required": ["language", "code"],
        "additionalProperties": false
    })
}

/// JSON Schema (draft 2020-12) of the [`file_read`] parameters.
pub fn file_read_schema() -> Value {
    json!({
        "$schema": SCHEMA_DIALECT,
        "title": "file.read parameters",
        "description": "Read a regular file inside the allowed roots.",
        "type": "object",
        "properties": {
            "path": {
                "description": "File path; relative paths are relative to the work dir.",
                "type": "string",
                "minLength": 1
            },
            "max_bytes": {
                "description": "Read at most this many bytes (also capped by the agent).",
                "type": "integer",
                "minimum": 0
            }
        },
        "required": ["path"],
        "additionalProperties": false
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{future::Future, os::unix::fs::symlink, time::Instant};

    use super::*;

    /// Upper bound for any single test step that runs processes.
    const STEP_LIMIT: Duration = Duration::from_secs(30);

    async fn bounded<F: Future>(fut: F) -> F::Output {
        tokio::time::timeout(STEP_LIMIT, fut)
            .await
            .expect("test step timed out")
    }

    fn options_in(root: &Path) -> PolicyOptions {
        PolicyOptions {
            allow_paths: vec![root.to_path_buf()],
            work_dir: root.to_path_buf(),
            ..PolicyOptions::default()
        }
    }

    fn policy_in(root: &Path) -> Policy {
        Policy::new(options_in(root)).unwrap()
    }

    fn policy_with(root: &Path, tweak: impl FnOnce(&mut PolicyOptions)) -> Policy {
        let mut opts = options_in(root);
        tweak(&mut opts);
        Policy::new(opts).unwrap()
    }

    async fn shell(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
        bounded(shell_run(policy, params)).await
    }

    async fn read(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
        bounded(file_read(policy, params)).await
    }

    fn assert_denied(r: Result<Value, SandboxError>) {
        match r {
            Err(e @ SandboxError::PermissionDenied(_)) => {
                assert_eq!(e.code(), ErrorCode::PermissionDenied);
            }
            other => panic!("expected PermissionDenied, got {other:?}"),
        }
    }

    fn assert_bad_request(r: Result<Value, SandboxError>) -> String {
        match r {
            Err(e @ SandboxError::BadRequest(_)) => {
                assert_eq!(e.code(), ErrorCode::BadRequest);
                e.to_string()
            }
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }

    // ---- policy ----

    #[test]
    fn policy_canonicalizes_and_resolves_programs() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| {
            o.allow_paths.push(dir.path().join("."));
            o.allow_programs
                .push("definitely-not-a-program-xyz".to_owned());
        });
        assert_eq!(policy.roots(), &[dir.path().canonicalize().unwrap()]);
        assert_eq!(policy.work_dir(), dir.path().canonicalize().unwrap());
        assert!(policy.program("definitely-not-a-program-xyz").is_none());
        let echo = policy.program("echo").unwrap().to_path_buf();
        assert!(echo.is_absolute());
        assert_eq!(policy.program(echo.to_str().unwrap()), Some(echo.as_path()));
        assert!(policy.allows_shell());
        let line = policy.describe();
        assert!(
            line.contains("shell=allowed") && line.contains("echo"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn policy_rejects_bad_options() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = Policy::new(PolicyOptions {
            allow_paths: vec![missing],
            ..options_in(dir.path())
        })
        .unwrap_err();
        assert!(matches!(err, SandboxError::Io { .. }), "{err:?}");
        assert_eq!(err.code(), ErrorCode::Internal);

        let other = tempfile::tempdir().unwrap();
        let err = Policy::new(PolicyOptions {
            allow_paths: vec![other.path().to_path_buf()],
            ..options_in(dir.path())
        })
        .unwrap_err();
        assert!(matches!(err, SandboxError::InvalidPolicy(_)), "{err:?}");

        let err = Policy::new(PolicyOptions {
            timeout: Duration::ZERO,
            ..options_in(dir.path())
        })
        .unwrap_err();
        assert!(matches!(err, SandboxError::InvalidPolicy(_)), "{err:?}");

        // Empty allow_paths means [work_dir].
        let policy = Policy::new(PolicyOptions {
            allow_paths: vec![],
            ..options_in(dir.path())
        })
        .unwrap();
        assert_eq!(policy.roots(), &[dir.path().canonicalize().unwrap()]);
    }

    #[test]
    fn error_codes() {
        assert_eq!(
            SandboxError::Internal("x".into()).code(),
            ErrorCode::Internal
        );
        let io = SandboxError::Io {
            context: "x".into(),
            source: io::Error::other("y"),
        };
        assert_eq!(io.code(), ErrorCode::Internal);
    }

    #[test]
    fn bounded_push_never_exceeds_cap() {
        let mut buf = Vec::new();
        assert!(!push_bounded(&mut buf, &[1; 600], 1000));
        assert!(push_bounded(&mut buf, &[2; 600], 1000));
        assert_eq!(buf.len(), 1000);
        assert!(buf.capacity() <= 1000);
        assert!(push_bounded(&mut buf, &[3; 1], 1000));
        assert_eq!(buf.len(), 1000);
    }

    // ---- shell.run ----

    #[tokio::test]
    async fn argv_echo_works() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = shell(&policy, json!({"argv": ["echo", "hi"]}))
            .await
            .unwrap();
        assert_eq!(r["stdout"], "hi\n");
        assert_eq!(r["stderr"], "");
        assert_eq!(r["exit_code"], 0);
        assert_eq!(r["signal"], Value::Null);
        assert_eq!(r["timed_out"], false);
        assert_eq!(r["truncated"], false);
        assert!(r["duration_ms"].is_u64());
    }

    #[tokio::test]
    async fn argv0_may_be_the_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let echo = policy.program("echo").unwrap().to_str().unwrap().to_owned();
        let r = shell(&policy, json!({"argv": [echo, "x"]})).await.unwrap();
        assert_eq!(r["stdout"], "x\n");
    }

    #[tokio::test]
    async fn program_not_allowed_is_denied() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        assert_denied(shell(&policy, json!({"argv": ["rm", "-rf", "x"]})).await);
        assert_denied(shell(&policy, json!({"argv": ["/bin/rm", "x"]})).await);
        // A different path with an allowed name is not the allowed program.
        assert_denied(shell(&policy, json!({"argv": ["./echo", "x"]})).await);
        let policy = policy_with(dir.path(), |o| o.allow_programs = vec!["echo".into()]);
        assert_denied(shell(&policy, json!({"argv": ["cat", "/etc/passwd"]})).await);
    }

    #[tokio::test]
    async fn command_runs_with_shell_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = shell(&policy, json!({"command": "echo hi | wc -c"}))
            .await
            .unwrap();
        assert_eq!(r["stdout"].as_str().unwrap().trim(), "3");
        assert_eq!(r["exit_code"], 0);
    }

    #[tokio::test]
    async fn command_without_sh_is_denied() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| o.allow_programs.retain(|p| p != "sh"));
        assert!(!policy.allows_shell());
        let err = shell(&policy, json!({"command": "echo hi"}))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("shell commands are not allowed"),
            "{err}"
        );
        assert_denied(Err(err));
        // argv still works.
        let r = shell(&policy, json!({"argv": ["echo", "ok"]}))
            .await
            .unwrap();
        assert_eq!(r["stdout"], "ok\n");
    }

    #[tokio::test]
    async fn argv_metacharacters_are_literal() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let evil = "$(id); rm -rf x `id` | cat > y && echo *";
        let r = shell(&policy, json!({"argv": ["echo", evil]}))
            .await
            .unwrap();
        assert_eq!(r["stdout"], format!("{evil}\n"));
        assert!(!dir.path().join("y").exists());
    }

    #[tokio::test]
    async fn nonzero_exit_code_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = shell(&policy, json!({"argv": ["false"]})).await.unwrap();
        assert_eq!(r["exit_code"], 1);
        let r = shell(&policy, json!({"command": "echo oops >&2; exit 3"}))
            .await
            .unwrap();
        assert_eq!(r["exit_code"], 3);
        assert_eq!(r["stderr"], "oops\n");
        assert_eq!(r["signal"], Value::Null);
    }

    #[tokio::test]
    async fn stdin_is_passed_and_defaults_to_empty() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = shell(&policy, json!({"argv": ["cat"], "stdin": "hello\nworld"}))
            .await
            .unwrap();
        assert_eq!(r["stdout"], "hello\nworld");
        // No stdin: /dev/null, so cat ends at once instead of hanging.
        let r = shell(&policy, json!({"argv": ["cat"]})).await.unwrap();
        assert_eq!(r["stdout"], "");
        // A child that ignores a large stdin must not wedge the call.
        let big = "x".repeat(4 * 1024 * 1024);
        let r = shell(&policy, json!({"argv": ["true"], "stdin": big}))
            .await
            .unwrap();
        assert_eq!(r["exit_code"], 0);
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let started = Instant::now();
        let r = shell(
            &policy,
            json!({"command": "sleep 30; echo late", "timeout_ms": 200}),
        )
        .await
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(r["timed_out"], true);
        assert_eq!(r["exit_code"], Value::Null);
        assert_eq!(r["signal"], 9);
        assert_eq!(r["stdout"], "");
    }

    #[tokio::test]
    async fn policy_timeout_caps_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| o.timeout = Duration::from_millis(300));
        let started = Instant::now();
        let r = shell(
            &policy,
            json!({"command": "sleep 30", "timeout_ms": 3_600_000}),
        )
        .await
        .unwrap();
        assert_eq!(r["timed_out"], true);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn background_children_do_not_hold_the_call() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let started = Instant::now();
        let r = shell(&policy, json!({"command": "sleep 30 & echo started"}))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(r["stdout"], "started\n");
        assert_eq!(r["exit_code"], 0);
        assert_eq!(r["timed_out"], false);
    }

    /// Pids (in the test's PID namespace) of `sleep` processes whose
    /// arguments contain `marker`: children may live in a PID namespace of
    /// their own, so their `$!` means nothing here.
    fn sleepers(marker: &str) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                // A zombie waiting for its reaper no longer runs.
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                (cmd.starts_with("sleep ") && cmd.contains(marker) && state != "Z" && state != "X")
                    .then_some(pid)
            })
            .collect()
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_group() {
        if !Path::new("/proc/self/stat").exists() {
            eprintln!("skipping: /proc is not available");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let marker = format!("{}.{nanos:09}", 300 + std::process::id() % 500);
        let cmd = format!("sleep {marker} & wait");
        let mut call = Box::pin(shell_run(&policy, json!({"command": cmd})));
        // Let it start the background sleep, then drop the future.
        let started = Instant::now();
        loop {
            tokio::select! {
                r = &mut call => panic!("the call finished early: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if !sleepers(&marker).is_empty() {
                break;
            }
            assert!(started.elapsed() < STEP_LIMIT, "the command never started");
        }
        drop(call);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sleepers(&marker).is_empty() {
            assert!(
                Instant::now() < deadline,
                "background sleep {marker} survived the drop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn output_is_truncated_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| o.max_output_bytes = 1000);
        // 10 MB through a pipeline (inside sh, any program on PATH runs).
        let r = shell(
            &policy,
            json!({"command": "head -c 10000000 /dev/zero | tr '\\0' a; echo done >&2"}),
        )
        .await
        .unwrap();
        assert_eq!(r["truncated"], true);
        assert_eq!(r["stdout"].as_str().unwrap().len(), 1000);
        assert_eq!(r["stderr"], "done\n");
        assert_eq!(r["exit_code"], 0);

        let r = shell(
            &policy,
            json!({"argv": ["head", "-c", "10000000", "/dev/zero"]}),
        )
        .await
        .unwrap();
        assert_eq!(r["truncated"], true);
        assert_eq!(r["stdout"].as_str().unwrap().len(), 1000);
        assert_eq!(r["exit_code"], 0);
    }

    #[tokio::test]
    async fn truncation_does_not_split_characters() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| o.max_output_bytes = 5);
        // "é" is two bytes: 5 bytes would cut the third one in half.
        let r = shell(&policy, json!({"argv": ["echo", "ééé"]}))
            .await
            .unwrap();
        assert_eq!(r["stdout"], "éé");
        assert_eq!(r["truncated"], true);
    }

    #[tokio::test]
    async fn cwd_is_confined() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let policy = policy_in(dir.path());
        let r = shell(&policy, json!({"argv": ["pwd"], "cwd": "sub"}))
            .await
            .unwrap();
        let expected = dir.path().canonicalize().unwrap().join("sub");
        assert_eq!(r["stdout"], format!("{}\n", expected.display()));
        let r = shell(&policy, json!({"argv": ["pwd"]})).await.unwrap();
        assert_eq!(r["stdout"], format!("{}\n", policy.work_dir().display()));

        let outside = tempfile::tempdir().unwrap();
        let outside = outside.path().to_str().unwrap().to_owned();
        assert_denied(shell(&policy, json!({"argv": ["pwd"], "cwd": outside})).await);
        assert_denied(shell(&policy, json!({"argv": ["pwd"], "cwd": "/"})).await);
        assert_denied(shell(&policy, json!({"argv": ["pwd"], "cwd": ".."})).await);
        assert_bad_request(shell(&policy, json!({"argv": ["pwd"], "cwd": "nope"})).await);
    }

    #[tokio::test]
    async fn resource_limits_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| {
            o.cpu_seconds = 7;
            o.memory_bytes = 512 * MIB;
            o.max_processes = 100;
        });
        let r = shell(
            &policy,
            json!({"command": "ulimit -t; ulimit -v; ulimit -c; ulimit -p"}),
        )
        .await
        .unwrap();
        assert_eq!(r["stdout"], "7\n524288\n0\n100\n", "{r}");
    }

    #[tokio::test]
    async fn environment_is_scrubbed() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = shell(&policy, json!({"argv": ["env"]})).await.unwrap();
        let out = r["stdout"].as_str().unwrap();
        let mut keys: Vec<&str> = out
            .lines()
            .filter_map(|line| line.split_once('=').map(|(k, _)| k))
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["HOME", "LANG", "PATH", "TMPDIR"], "{out}");
        assert!(out.contains(&format!("PATH={SANDBOX_PATH}\n")));
        assert!(out.contains(&format!("HOME={}\n", policy.work_dir().display())));
        assert!(out.contains("LANG=C.UTF-8\n"));
        // Nothing of the test process's own environment leaks.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if !["HOME", "LANG", "PATH", "TMPDIR"].contains(&key.as_ref()) {
                assert!(
                    !out.contains(&format!("{key}=")),
                    "{key} leaked into the child"
                );
            }
        }
    }

    #[tokio::test]
    async fn malformed_params_are_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let msg = assert_bad_request(shell(&policy, json!({"argv": ["echo"], "env": {}})).await);
        assert!(msg.contains("unknown field `env`"), "{msg}");
        assert_bad_request(shell(&policy, json!({"argv": []})).await);
        assert_bad_request(shell(&policy, json!({})).await);
        assert_bad_request(shell(&policy, json!({"argv": ["echo"], "command": "echo"})).await);
        assert_bad_request(shell(&policy, json!({"argv": "echo hi"})).await);
        assert_bad_request(shell(&policy, json!({"argv": ["echo", 1]})).await);
        assert_bad_request(shell(&policy, json!({"argv": ["echo"], "timeout_ms": 0})).await);
        assert_bad_request(shell(&policy, json!({"argv": ["echo"], "timeout_ms": -5})).await);
        assert_bad_request(shell(&policy, json!({"argv": ["echo", "a\0b"]})).await);
        assert_bad_request(shell(&policy, json!(["echo"])).await);
        assert_bad_request(shell(&policy, Value::Null).await);
        let msg = assert_bad_request(
            bounded(code_execute(
                &policy,
                json!({"language": "ruby", "code": "1"}),
            ))
            .await,
        );
        assert!(msg.contains("ruby"), "{msg}");
        assert_bad_request(read(&policy, json!({"path": "x", "follow": true})).await);
        assert_bad_request(read(&policy, json!({"path": ""})).await);
    }

    // ---- code.execute ----

    #[tokio::test]
    async fn code_execute_python() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        if policy.program("python3").is_none() {
            eprintln!("skipping: python3 is not installed in {SANDBOX_PATH}");
            return;
        }
        let code = "import os, sys\nprint(sum(range(10)))\nprint(os.getcwd() == os.environ['TMPDIR'])\nprint(sys.stdin.read().upper())";
        let r = bounded(code_execute(
            &policy,
            json!({"language": "python", "code": code, "stdin": "abc"}),
        ))
        .await
        .unwrap();
        assert_eq!(r["stdout"], "45\nTrue\nABC\n", "{r}");
        assert_eq!(r["exit_code"], 0);
    }

    #[tokio::test]
    async fn code_execute_sh_runs_in_a_removed_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = bounded(code_execute(
            &policy,
            json!({"language": "sh", "code": "pwd; ls; exit 4"}),
        ))
        .await
        .unwrap();
        assert_eq!(r["exit_code"], 4);
        let out = r["stdout"].as_str().unwrap();
        let mut lines = out.lines();
        let tmp = PathBuf::from(lines.next().unwrap());
        assert!(
            tmp.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("fem-coder-"),
            "{out}"
        );
        assert_eq!(lines.next(), Some("main.sh"));
        assert!(
            !tmp.exists(),
            "temporary directory {} was not removed",
            tmp.display()
        );
    }

    #[tokio::test]
    async fn code_execute_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let r = bounded(code_execute(
            &policy,
            json!({"language": "sh", "code": "sleep 30", "timeout_ms": 200}),
        ))
        .await
        .unwrap();
        assert_eq!(r["timed_out"], true);
    }

    #[tokio::test]
    async fn code_execute_interpreter_not_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_with(dir.path(), |o| o.allow_programs = vec!["echo".into()]);
        assert_denied(
            bounded(code_execute(
                &policy,
                json!({"language": "python", "code": "print(1)"}),
            ))
            .await,
        );
        assert_denied(
            bounded(code_execute(
                &policy,
                json!({"language": "sh", "code": "id"}),
            ))
            .await,
        );
    }

    #[tokio::test]
    async fn code_execute_rejects_huge_code() {
        let dir = tempfile::tempdir().unwrap();
        let policy = policy_in(dir.path());
        let code = "#".repeat(MAX_CODE_BYTES + 1);
        assert_bad_request(
            bounded(code_execute(
                &policy,
                json!({"language": "sh", "code": code}),
            ))
            .await,
        );
    }

    // ---- file.read ----

    #[tokio::test]
    async fn file_read_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "héllo\n").unwrap();
        let policy = policy_in(dir.path());
        let r = read(&policy, json!({"path": "sub/a.txt"})).await.unwrap();
        let canonical = dir.path().canonicalize().unwrap().join("sub/a.txt");
        assert_eq!(r["path"], canonical.to_str().unwrap());
        assert_eq!(r["content"], "héllo\n");
        assert_eq!(r["encoding"], "utf8");
        assert_eq!(r["size"], 7);
        assert_eq!(r["truncated"], false);
        // Absolute paths and harmless `..` inside the root work too.
        let abs = dir.path().join("sub/../sub/./a.txt");
        let r = read(&policy, json!({"path": abs.to_str().unwrap()}))
            .await
            .unwrap();
        assert_eq!(r["path"], canonical.to_str().unwrap());
    }

    #[tokio::test]
    async fn file_read_outside_root_is_denied() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(base.path().join("secret"), "s3cret").unwrap();
        let policy = policy_in(&root);
        let secret = base.path().join("secret");
        assert_denied(read(&policy, json!({"path": secret.to_str().unwrap()})).await);
        assert_denied(read(&policy, json!({"path": "/etc/passwd"})).await);
        // `..` escape.
        assert_denied(read(&policy, json!({"path": "../secret"})).await);
        assert_denied(read(&policy, json!({"path": "sub/../../secret"})).await);
        // Non-existent paths outside do not reveal that they are missing.
        assert_denied(read(&policy, json!({"path": "../missing"})).await);
        let msg = assert_bad_request(read(&policy, json!({"path": "missing"})).await);
        assert!(msg.contains("not found"), "{msg}");
    }

    #[tokio::test]
    async fn file_read_symlink_escape_is_denied() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        let outside = base.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s3cret").unwrap();
        symlink(outside.join("secret"), root.join("link")).unwrap();
        symlink(&outside, root.join("dirlink")).unwrap();
        std::fs::write(root.join("ok"), "fine").unwrap();
        symlink(root.join("ok"), root.join("innerlink")).unwrap();
        let policy = policy_in(&root);
        assert_denied(read(&policy, json!({"path": "link"})).await);
        assert_denied(read(&policy, json!({"path": "dirlink/secret"})).await);
        // cwd through the symlinked directory is refused as well.
        assert_denied(shell(&policy, json!({"argv": ["pwd"], "cwd": "dirlink"})).await);
        // A symlink that stays inside the root is fine.
        let r = read(&policy, json!({"path": "innerlink"})).await.unwrap();
        assert_eq!(r["content"], "fine");
        assert!(r["path"].as_str().unwrap().ends_with("/ok"));
    }

    #[tokio::test]
    async fn file_read_sibling_prefix_is_denied() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("a");
        let sibling = base.path().join("ab");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&sibling).unwrap();
        std::fs::write(sibling.join("f"), "nope").unwrap();
        let policy = policy_in(&root);
        assert_denied(
            read(
                &policy,
                json!({"path": sibling.join("f").to_str().unwrap()}),
            )
            .await,
        );
        assert_denied(read(&policy, json!({"path": "../ab/f"})).await);
    }

    #[tokio::test]
    async fn file_read_binary_is_base64() {
        let dir = tempfile::tempdir().unwrap();
        let data = [0u8, 159, 146, 150, 255, b'a'];
        std::fs::write(dir.path().join("bin"), data).unwrap();
        let policy = policy_in(dir.path());
        let r = read(&policy, json!({"path": "bin"})).await.unwrap();
        assert_eq!(r["encoding"], "base64");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(r["content"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, data);
        assert_eq!(r["size"], 6);
    }

    #[tokio::test]
    async fn file_read_truncates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big"), "0123456789".repeat(1000)).unwrap();
        let policy = policy_with(dir.path(), |o| o.max_file_bytes = 100);
        let r = read(&policy, json!({"path": "big", "max_bytes": 5}))
            .await
            .unwrap();
        assert_eq!(r["content"], "01234");
        assert_eq!(r["truncated"], true);
        assert_eq!(r["size"], 10_000);
        // max_bytes cannot exceed the policy cap.
        let r = read(&policy, json!({"path": "big", "max_bytes": 1_000_000}))
            .await
            .unwrap();
        assert_eq!(r["content"].as_str().unwrap().len(), 100);
        assert_eq!(r["truncated"], true);
        // Exactly the file size is not truncated.
        std::fs::write(dir.path().join("small"), "abc").unwrap();
        let r = read(&policy, json!({"path": "small", "max_bytes": 3}))
            .await
            .unwrap();
        assert_eq!(r["content"], "abc");
        assert_eq!(r["truncated"], false);
        let r = read(&policy, json!({"path": "small", "max_bytes": 0}))
            .await
            .unwrap();
        assert_eq!(r["content"], "");
        assert_eq!(r["truncated"], true);
        // A character cut by truncation is dropped, and the result stays utf8.
        std::fs::write(dir.path().join("utf"), "aé").unwrap();
        let r = read(&policy, json!({"path": "utf", "max_bytes": 2}))
            .await
            .unwrap();
        assert_eq!(r["encoding"], "utf8");
        assert_eq!(r["content"], "a");
        assert_eq!(r["truncated"], true);
    }

    #[tokio::test]
    async fn file_read_rejects_non_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let policy = policy_in(dir.path());
        let msg = assert_bad_request(read(&policy, json!({"path": "sub"})).await);
        assert!(msg.contains("not a regular file"), "{msg}");
        let msg = assert_bad_request(read(&policy, json!({"path": "."})).await);
        assert!(msg.contains("not a regular file"), "{msg}");
    }

    // ---- schemas ----

    #[test]
    fn schemas_are_valid_and_match_the_params() {
        for schema in [
            shell_run_schema(),
            code_execute_schema(),
            file_read_schema(),
        ] {
            assert_eq!(schema["$schema"], SCHEMA_DIALECT);
            assert!(jsonschema::meta::is_valid(&schema), "{schema}");
        }
        let shell = jsonschema::validator_for(&shell_run_schema()).unwrap();
        assert!(shell.is_valid(&json!({"argv": ["git", "status"], "cwd": "x", "timeout_ms": 5})));
        assert!(shell.is_valid(&json!({"command": "echo hi | wc -c", "stdin": ""})));
        assert!(!shell.is_valid(&json!({"argv": ["a"], "command": "b"})));
        assert!(!shell.is_valid(&json!({"argv": []})));
        assert!(!shell.is_valid(&json!({})));
        assert!(!shell.is_valid(&json!({"argv": ["a"], "extra": 1})));
        let code = jsonschema::validator_for(&code_execute_schema()).unwrap();
        assert!(code.is_valid(&json!({"language": "python", "code": "print(1)"})));
        assert!(!code.is_valid(&json!({"language": "ruby", "code": "1"})));
        assert!(!code.is_valid(&json!({"language": "sh"})));
        let file = jsonschema::validator_for(&file_read_schema()).unwrap();
        assert!(file.is_valid(&json!({"path": "a", "max_bytes": 10})));
        assert!(!file.is_valid(&json!({"path": "a", "max_bytes": -1})));
        assert!(!file.is_valid(&json!({"max_bytes": 1})));
    }
}

//! The sandbox behind fem-coder's tools: `shell.run`, `code.execute` and
//! `file.read`.
//!
//! Each tool function takes the JSON parameters of a tool call and returns the
//! JSON result, or a [`SandboxError`] whose [`SandboxError::code`] is the
//! protocol error code to answer with. Everything is decided by a [`Policy`]
//! built once at startup from [`PolicyOptions`].
//!
//! What the sandbox enforces:
//! - only allowed programs run, by the absolute path resolved at startup, with
//!   arguments passed as a vector (no shell unless `sh` is allowed and the
//!   caller asks for `command`);
//! - children get a scrubbed environment (`PATH`, `HOME`, `LANG`, `TMPDIR`
//!   only), their own process group, resource limits (CPU, address space,
//!   processes, no core dumps), a deadline after which the whole group is
//!   killed, and capped output; the group is also killed when the leader exits
//!   or the call is cancelled;
//! - `file.read` and `cwd` are confined to the allowed roots after resolving
//!   symlinks and `..`.
//!
//! What it does not: it is not an OS-level sandbox. Children run with the
//! agent's uid and can read, write and connect wherever that uid can; an
//! allowed `cat` or `sh` reaches files outside the roots. Processes that leave
//! the group (`setsid`) escape the group kill. For real isolation run the agent
//! in a container or an unprivileged account. `RLIMIT_NPROC` counts every
//! process of the child's real uid (not just the child's descendants) and is
//! not enforced at all for root or holders of `CAP_SYS_RESOURCE`.

mod exec;
mod fs;

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use fem_proto::ErrorCode;
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
}

impl Policy {
    /// Validates `opts`.
    ///
    /// Allowed programs that cannot be found are dropped with a warning.
    ///
    /// Errors: [`SandboxError::Io`] if the work dir or an allowed path cannot
    /// be canonicalized (e.g. it does not exist); [`SandboxError::InvalidPolicy`]
    /// if one of them is not a directory, the work dir is outside every
    /// allowed path, or the timeout or a resource limit is zero.
    pub fn new(opts: PolicyOptions) -> Result<Self, SandboxError> {
        let invalid = |msg: &str| Err(SandboxError::InvalidPolicy(msg.to_owned()));
        if opts.timeout.is_zero() {
            return invalid("timeout must be greater than zero");
        }
        if opts.cpu_seconds == 0 || opts.memory_bytes == 0 || opts.max_processes == 0 {
            return invalid("cpu_seconds, memory_bytes and max_processes must be greater than zero");
        }
        let work_dir = canonical_dir(&opts.work_dir, "work dir")?;
        let raw_roots =
            if opts.allow_paths.is_empty() { vec![work_dir.clone()] } else { opts.allow_paths };
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
        })
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
            if self.allows_shell() { "allowed" } else { "denied" },
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
        self.programs.iter().map(|(name, path)| (name.as_str(), path.as_path()))
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
        self.programs.values().find(|p| p.as_path() == wanted).map(PathBuf::as_path)
    }

    fn program_names(&self) -> String {
        self.programs.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    }

    /// `timeout_ms` 0 is rejected; larger values are clamped to the policy.
    fn effective_timeout(&self, timeout_ms: Option<u64>) -> Result<Duration, SandboxError> {
        match timeout_ms {
            None => Ok(self.timeout),
            Some(0) => Err(SandboxError::BadRequest("timeout_ms must be at least 1".to_owned())),
            Some(ms) => Ok(Duration::from_millis(ms).min(self.timeout)),
        }
    }
}

fn canonical_dir(raw: &Path, what: &str) -> Result<PathBuf, SandboxError> {
    let dir = std::fs::canonicalize(raw)
        .map_err(|e| SandboxError::Io { context: format!("{what} {}", raw.display()), source: e })?;
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
            let target = buf.capacity().saturating_mul(2).max(buf.len() + take).min(cap);
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReadParams {
    path: String,
    max_bytes: Option<u64>,
}

fn parse_params<T: DeserializeOwned>(tool: &str, params: Value) -> Result<T, SandboxError> {
    if !params.is_object() {
        return Err(SandboxError::BadRequest(format!("{tool} parameters must be a JSON object")));
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

fn check_no_nul(what: &str, s: &str) -> Result<(), SandboxError> {
    if s.contains('\0') {
        return Err(SandboxError::BadRequest(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

/// Runs a program (`argv`) or, if the policy allows `sh`, a shell command
/// (`command`). Params: `{"argv": [..] | "command": "..", "cwd"?, "stdin"?,
/// "timeout_ms"?}`; see [`shell_run_schema`]. Result: `{"stdout", "stderr",
/// "exit_code", "signal", "timed_out", "truncated", "duration_ms"}`. A
/// timeout is not an error: it is reported with `timed_out: true`.
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
    let (program, args) = match (p.argv, p.command) {
        (Some(argv), None) => {
            let mut argv = argv.into_iter();
            let Some(argv0) = argv.next() else {
                return Err(SandboxError::BadRequest("argv must not be empty".to_owned()));
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
                return Err(SandboxError::BadRequest("command must not be empty".to_owned()));
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
            return Err(SandboxError::BadRequest("one of `argv` or `command` is required".to_owned()));
        }
    };
    let cwd = match p.cwd {
        Some(raw) => fs::resolve_dir(policy, &raw).await?,
        None => policy.work_dir.clone(),
    };
    let spec = exec::Spec {
        program,
        args,
        cwd,
        stdin: p.stdin,
        timeout,
        tmpdir: std::env::temp_dir(),
        tool: SHELL_RUN,
    };
    exec::run(policy, spec).await
}

/// Runs a snippet of Python (`python3`) or shell (`sh`) code from a fresh
/// temporary directory, which is also its cwd and `TMPDIR` and is removed
/// afterwards. Params: `{"language": "python"|"sh", "code", "stdin"?,
/// "timeout_ms"?}`; see [`code_execute_schema`]. Result: as [`shell_run`].
///
/// Errors: `BadRequest` for malformed params or code over
/// [`MAX_CODE_BYTES`]; `PermissionDenied` if the interpreter is not an
/// allowed program; `Io` if the temporary directory cannot be set up or the
/// interpreter cannot be started.
pub async fn code_execute(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
    let p: CodeExecuteParams = parse_params(CODE_EXECUTE, params)?;
    let timeout = policy.effective_timeout(p.timeout_ms)?;
    check_stdin(p.stdin.as_ref())?;
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

    let dir = tempfile::Builder::new()
        .prefix("fem-coder-")
        .tempdir()
        .map_err(|e| SandboxError::Io { context: "creating a temporary directory".to_owned(), source: e })?;
    let file = dir.path().join(file_name);
    tokio::fs::write(&file, p.code.as_bytes())
        .await
        .map_err(|e| SandboxError::Io { context: format!("writing {}", file.display()), source: e })?;
    let spec = exec::Spec {
        program,
        args: vec![file.to_string_lossy().into_owned()],
        cwd: dir.path().to_path_buf(),
        stdin: p.stdin,
        timeout,
        tmpdir: dir.path().to_path_buf(),
        tool: CODE_EXECUTE,
    };
    let result = exec::run(policy, spec).await;
    // Removing what the child left there can take a while: not on the runtime.
    let removal = tokio::task::spawn_blocking(move || dir.close()).await;
    if let Ok(Err(e)) | Err(e) = removal.map_err(io::Error::other) {
        tracing::warn!(error = %e, "removing the code.execute temporary directory failed");
    }
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
/// symlinks or `..`) outside the allowed roots or is unreadable; `Io` or
/// `Internal` for read failures.
pub async fn file_read(policy: &Policy, params: Value) -> Result<Value, SandboxError> {
    let p: FileReadParams = parse_params(FILE_READ, params)?;
    let limit = p.max_bytes.unwrap_or(policy.max_file_bytes).min(policy.max_file_bytes);
    let path = fs::resolve_in_roots(policy, &p.path, "path").await?;
    let roots = policy.roots.clone();
    let read_path = path.clone();
    let content = tokio::task::spawn_blocking(move || fs::read_bounded(&read_path, limit, &roots))
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
    (base64::engine::general_purpose::STANDARD.encode(&bytes), "base64")
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

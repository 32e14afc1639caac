//! `tenantgate`: the command policy authors and operators use (verbs, flags and exit statuses: docs/reference.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};

use tenantgate_engine::http::RequestSpec;
use tenantgate_engine::{Bundle, Decision, Diagnostics, Engine, Worker};

mod diff;
mod fmt;
mod limits;
use tenantgate_serve::policytest;
mod render;
mod simulate;

#[derive(Parser)]
#[command(
    name = "tenantgate",
    version,
    about = "Cedar policies and hierarchical quotas for nested tenants, in Envoy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate a policy folder or bundle; every error with file, line and column.
    Validate { source: PathBuf },
    /// Compile a policy folder into the bundle (the filter's plugin configuration).
    Bundle {
        dir: PathBuf,
        /// Write the bundle here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Decide one request exactly as the filter would and print the decision as JSON.
    ///
    /// The request goes through the filter's own mapping: `--tenant`,
    /// `--principal` and `--principal-tenant` are placed where the bundle reads
    /// them (a header, the path after the prefix, or metadata); `--header`
    /// adds raw headers, so a request can also be given entirely as Envoy sees it.
    Check {
        source: PathBuf,
        #[arg(long)]
        tenant: Option<String>,
        /// The method as sent (`get` is refused with 400, as in Envoy).
        #[arg(long)]
        method: String,
        /// The raw path, query included.
        #[arg(long)]
        path: String,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long = "principal-tenant")]
        principal_tenant: Option<String>,
        /// A raw request header, `name=value` (the value as sent); repeatable.
        #[arg(long = "header", value_name = "K=V")]
        headers: Vec<String>,
        /// JWT claims (a JSON object), sent in the bundle's `claims` header.
        #[arg(long)]
        claims: Option<String>,
        /// JSON object merged over the request context (e.g. `{"time": {...}}`).
        #[arg(long)]
        context: Option<String>,
    },
    /// Run the policy tests in `DIR/tests/*.json`.
    Test { dir: PathBuf },
    /// Replay a traffic plan against the quotas on a virtual clock (policies are not evaluated).
    Simulate {
        source: PathBuf,
        /// The traffic plan (JSON).
        #[arg(long)]
        traffic: PathBuf,
        /// Draw admitted requests per second per tenant over time into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// What changed between two policy folders or bundles, and which policy-test decisions change.
    ///
    /// Policies are compared per tenant by id, in Cedar's normalized form;
    /// `tenant.json` as parsed JSON; the policy tests of OLD's folder (else
    /// NEW's, or `--tests DIR`) run against both bundles.
    #[command(
        after_help = "Exit status: 0 when no policy-test decision changes, 1 when some do, 2 when OLD, NEW or the tests cannot be loaded (the errors go to standard error)."
    )]
    Diff {
        /// What runs now: a policy folder, a bundle, or a config holding one (an Envoy
        /// bootstrap or ECDS file, Envoy's `/config_dump`, an Istio `WasmPlugin`).
        old: PathBuf,
        /// The candidate, in the same forms.
        new: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Run the policy tests of this folder (`DIR/tests/*.json`) instead of
        /// OLD's (or NEW's when OLD is a bundle).
        #[arg(long, value_name = "DIR")]
        tests: Option<PathBuf>,
    },
    /// Render an Envoy bootstrap, or an Istio `WasmPlugin`, that loads the filter with this bundle.
    Envoy {
        /// A bundle file or a policy folder.
        bundle: PathBuf,
        #[command(flatten)]
        options: Box<render::Options>,
        /// Write here instead of standard output (atomically: a temporary file, then a rename).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// The fleet limits as Limitador's limits file, envoyproxy/ratelimit's config, or plain Envoy's rate limit filter config.
    Limits {
        /// A policy folder or a bundle.
        source: PathBuf,
        #[arg(long, value_enum)]
        format: limits::Format,
        /// The rate limit domain (Limitador's namespace) the filters send (default: the bundle's `rate_limit_service.domain`).
        #[arg(long)]
        domain: Option<String>,
        #[command(flatten)]
        envoy: limits::EnvoyOptions,
    },
    /// Format the Cedar files under `DIR/tenants` in place; `--check` lists the files that would change (exit 1).
    Fmt {
        dir: PathBuf,
        #[arg(long)]
        check: bool,
    },
    /// Serve policy decisions: an HTTP JSON API and, with `--grpc`, Envoy's ext_authz (policies only; SIGHUP reloads);
    /// with `--xds`, the filter's configuration to a fleet of Envoys.
    #[command(
        after_help = "Exit status: 0 after a graceful shutdown (SIGTERM or SIGINT), 1 when it cannot start (the bundle, a listen address)."
    )]
    Serve {
        /// A policy folder or a bundle file; SIGHUP reads it again.
        source: PathBuf,
        /// Address of the HTTP JSON API, e.g. `127.0.0.1:8181` (port 0: any free port, logged).
        #[arg(long, value_name = "IP:PORT")]
        http: std::net::SocketAddr,
        /// Address of Envoy's ext_authz gRPC service, e.g. `127.0.0.1:9191`.
        #[arg(long, value_name = "IP:PORT")]
        grpc: Option<std::net::SocketAddr>,
        /// Serve the filter's configuration to Envoys over xDS (ECDS on ADS and
        /// the extension config discovery service) at this address; the source
        /// is watched and every change that validates and passes its policy
        /// tests is pushed.
        #[arg(long, value_name = "IP:PORT", requires = "wasm")]
        xds: Option<std::net::SocketAddr>,
        /// With `--xds`: the filter module as the Envoys see it (a path on their hosts).
        #[arg(long, value_name = "PATH", requires = "xds")]
        wasm: Option<String>,
        /// With `--xds`: `auto` pushes every new version to all nodes; `manual`
        /// keeps it until `POST /v1/rollout`.
        #[arg(long, value_enum, default_value = "auto", requires = "xds")]
        rollout: RolloutMode,
        /// With `--xds`: how many versions to keep for rollouts and rollbacks.
        #[arg(long, default_value_t = tenantgate_serve::rollout::DEFAULT_KEEP, value_name = "N", requires = "xds")]
        keep: usize,
        /// With `--xds`: let requests through when the filter cannot load or crashes (default: refuse them).
        #[arg(long = "fail-open", requires = "xds")]
        fail_open: bool,
    },
}

/// `serve --rollout`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RolloutMode {
    Auto,
    Manual,
}

/// A request as `check` and the policy tests describe it: the engine's
/// [`RequestSpec`], mapped by the filter's own code.
pub type RequestArgs = RequestSpec;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Validate { source } => run_validate(&source),
        Command::Bundle { dir, output } => run_bundle(&dir, output.as_deref()),
        Command::Check {
            source,
            tenant,
            method,
            path,
            principal,
            principal_tenant,
            headers,
            claims,
            context,
        } => {
            let spec = RequestSpec {
                tenant,
                method,
                path,
                principal,
                principal_tenant,
                headers: header_args(&headers)?,
                claims: json_arg("--claims", claims.as_deref())?.map(serde_json::Value::Object),
                context: json_arg("--context", context.as_deref())?,
                ..RequestSpec::default()
            };
            run_check(&source, &spec)
        }
        Command::Test { dir } => run_test(&dir),
        Command::Simulate {
            source,
            traffic,
            svg,
        } => run_simulate(&source, &traffic, svg.as_deref()),
        Command::Diff {
            old,
            new,
            json,
            tests,
        } => Ok(run_diff(&old, &new, json, tests.as_deref())),
        Command::Envoy {
            bundle,
            options,
            output,
        } => run_envoy(&bundle, &options, output.as_deref()),
        Command::Limits {
            source,
            format,
            domain,
            envoy,
        } => limits::run(&source, format, domain.as_deref(), &envoy),
        Command::Fmt { dir, check } => fmt::run(&dir, check),
        Command::Serve {
            source,
            http,
            grpc,
            xds,
            wasm,
            rollout,
            keep,
            fail_open,
        } => {
            let xds = xds.map(|addr| tenantgate_serve::xds::Options {
                addr,
                wasm: wasm.unwrap_or_default(),
                fail_open,
                mode: match rollout {
                    RolloutMode::Auto => tenantgate_serve::rollout::Mode::Auto,
                    RolloutMode::Manual => tenantgate_serve::rollout::Mode::Manual,
                },
                keep,
            });
            tenantgate_serve::run_blocking(tenantgate_serve::Config {
                source,
                http,
                grpc,
                xds,
            })
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| format!("tenantgate serve: error: {e}"))
        }
    }
}

fn run_validate(source: &Path) -> Result<ExitCode, String> {
    let (bundle, engine) = load(source)?;
    let limits = engine.quotas().is_empty();
    println!(
        "{}: ok: {} tenants, {} policies{}, version {}",
        source.display(),
        bundle.tenants.len(),
        engine.policy_count(),
        if limits { "" } else { ", limits valid" },
        bundle.version
    );
    Ok(ExitCode::SUCCESS)
}

fn run_bundle(dir: &Path, output: Option<&Path>) -> Result<ExitCode, String> {
    if !dir.is_dir() {
        return Err(format!("{}: error: not a policy folder", dir.display()));
    }
    let (bundle, _) = load(dir)?;
    let json = bundle.to_json();
    match output {
        Some(path) => {
            std::fs::write(path, json + "\n")
                .map_err(|e| format!("{}: error: cannot write: {e}", path.display()))?;
            eprintln!("wrote {} ({})", path.display(), bundle.version);
        }
        None => println!("{json}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `--header name=value` flags as raw headers (names lowercased, values as given).
fn header_args(headers: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for h in headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| format!("error: `--header {h}` must be `name=value`"))?;
        out.push((k.trim().to_ascii_lowercase(), v.to_string()));
    }
    Ok(out)
}

/// A flag holding a JSON object.
fn json_arg(
    flag: &str,
    text: Option<&str>,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    text.map(|t| {
        serde_json::from_str(t).map_err(|e| format!("error: `{flag}` is not a JSON object: {e}"))
    })
    .transpose()
}

fn run_check(source: &Path, spec: &RequestSpec) -> Result<ExitCode, String> {
    let (_, engine) = load(source)?;
    // Quotas charged in a fresh in-memory store: what a first request gets.
    let store = tenantgate_engine::quota::MemoryStore::new();
    let out = Worker::new(engine).check_output(spec, now_ns(), Some(&store))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn run_test(dir: &Path) -> Result<ExitCode, String> {
    let (_, engine) = load(dir)?;
    let tests = policytest::load(dir).map_err(|e| e.join("\n"))?;
    let (passed, failures) = policytest::run_all(&engine, &tests);
    for f in &failures {
        println!("{f}");
    }
    println!("{passed} passed, {} failed", failures.len());
    Ok(if failures.is_empty() && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_simulate(source: &Path, traffic: &Path, svg: Option<&Path>) -> Result<ExitCode, String> {
    let (bundle, engine) = load(source)?;
    let text = std::fs::read_to_string(traffic)
        .map_err(|e| format!("{}: error: cannot read: {e}", traffic.display()))?;
    let out = simulate::run(&bundle, &engine, &text, svg)
        .map_err(|e| format!("{}: error: {e}", traffic.display()))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn run_envoy(
    bundle: &Path,
    options: &render::Options,
    output: Option<&Path>,
) -> Result<ExitCode, String> {
    let (loaded, _) = load(bundle)?;
    let doc = render::render(&loaded, options)?;
    let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())? + "\n";
    match output {
        Some(path) => {
            write_atomically(path, &text)?;
            eprintln!("wrote {} ({})", path.display(), loaded.version);
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `diff` has its own exit statuses: 0 no decision changes, 1 some, 2 error.
fn run_diff(old: &Path, new: &Path, json: bool, tests: Option<&Path>) -> ExitCode {
    let result = diff::Side::load(old).and_then(|old| {
        let new = diff::Side::load(new)?;
        diff::diff(&old, &new, tests)
    });
    let report = match result {
        Ok(r) => r,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", diff::text(&report));
    }
    if report.decisions_changed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Writes a file so that a watcher (Envoy's ECDS) never sees it half-written:
/// a temporary file in the same folder, then a rename over the target.
fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)
        .map_err(|e| format!("{}: error: cannot write: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: error: cannot write: {e}", path.display())
    })
}

/// Loads a policy folder or a bundle file and compiles it.
pub fn load(source: &Path) -> Result<(Bundle, Arc<Engine>), String> {
    let bundle = if source.is_dir() {
        Bundle::from_dir(source).map_err(|d| prefix(source, &d))?
    } else {
        let text = std::fs::read_to_string(source)
            .map_err(|e| format!("{}: error: cannot read: {e}", source.display()))?;
        return load_text(source, &text);
    };
    let engine = Engine::new(&bundle).map_err(|d| prefix(source, &d))?;
    Ok((bundle, Arc::new(engine)))
}

/// Compiles a bundle document read from `source`.
pub fn load_text(source: &Path, text: &str) -> Result<(Bundle, Arc<Engine>), String> {
    let bundle = Bundle::from_json(text).map_err(|d| prefix(source, &d))?;
    let engine = Engine::new(&bundle).map_err(|d| prefix(source, &d))?;
    Ok((bundle, Arc::new(engine)))
}

/// Error lines carry paths relative to the folder; show them as the user typed it.
fn prefix(source: &Path, d: &Diagnostics) -> String {
    let mut out = Vec::new();
    for diag in d.iter() {
        let mut diag = diag.clone();
        if source.is_dir() {
            diag.file = source.join(&diag.file).display().to_string();
        } else if diag.file == "bundle" {
            diag.file = source.display().to_string();
        } else {
            diag.file = format!("{} ({})", source.display(), diag.file);
        }
        out.push(diag.to_string());
    }
    out.push(format!(
        "{} error{}",
        d.len(),
        if d.len() == 1 { "" } else { "s" }
    ));
    out.join("\n")
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Decides a request given by its parts, through the filter's own mapping.
pub fn decide(engine: &Arc<Engine>, args: &RequestSpec) -> Result<Decision, String> {
    decide_at(engine, args, now_ns())
}

/// [`decide`] at a given time (nanoseconds since the Unix epoch). Quotas are
/// charged in a fresh in-memory store (a first request).
pub fn decide_at(engine: &Arc<Engine>, args: &RequestSpec, now: u64) -> Result<Decision, String> {
    let store = tenantgate_engine::quota::MemoryStore::new();
    let worker = Worker::new(Arc::clone(engine));
    Ok(worker.check(args, now, Some(&store))?.decision)
}

//! `tenantgate`: the command policy authors and operators use (verbs, flags and exit statuses: docs/reference.md).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand};

use tenantgate_engine::diag::Severity;
use tenantgate_engine::http::RequestSpec;
use tenantgate_engine::{Bundle, Decision, Diagnostic, Diagnostics, Engine, Worker};

mod diff;
mod fmt;
mod limits;
use tenantgate_serve::policytest;
mod render;
mod simulate;

/// The exit statuses of every verb (docs/reference.md, "Exit statuses").
const EXIT_STATUSES: &str = "\
Exit status: 0 success; 1 the source does not load, a test failed, a check found something \
(per verb: docs/reference.md, \"Exit statuses\"); 2 a usage error (an unknown flag, a missing \
or malformed argument). `diff`: 0 no decision changes, 1 some, 2 an error.

Examples:
  tenantgate validate policies
  tenantgate test policies --run 'acme reads'
  tenantgate check policies --tenant /acme/eu --method GET --path /orders/1 --principal alice
  tenantgate bundle policies -o bundle.json
  tenantgate completions bash > /etc/bash_completion.d/tenantgate";

#[derive(Parser)]
#[command(
    name = "tenantgate",
    version,
    about = "Cedar policies and hierarchical quotas for nested tenants, in Envoy",
    after_help = EXIT_STATUSES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate a policy folder or bundle; every error with file, line and column.
    #[command(
        after_help = "Warnings (a file in the folder that is not read, `default_tenant` naming no tenant) and notes (no schema, fleet limits without `rate_limit_service`) go to standard error; `--strict` makes warnings errors.\n\nExit status: 0 valid, 1 errors (or warnings with `--strict`), 2 usage error.\n\nExample: tenantgate validate policies --strict"
    )]
    Validate {
        /// A policy folder or a bundle file.
        source: PathBuf,
        /// Refuse warnings as errors.
        #[arg(long)]
        strict: bool,
        /// `text`, or `json`: one object on standard output, `{"ok", "source", "version", "tenants", "policies", "diagnostics"}`.
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
    /// Compile a policy folder into the bundle (the filter's plugin configuration).
    #[command(
        after_help = "Exit status: 0 written, 1 the folder does not load (or has warnings, with `--strict`), 2 usage error.\n\nExample: tenantgate bundle policies -o bundle.json"
    )]
    Bundle {
        /// The policy folder.
        dir: PathBuf,
        /// Write the bundle here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Refuse warnings as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Decide one request exactly as the filter would and print the decision as JSON.
    ///
    /// The request goes through the filter's own mapping: `--tenant`,
    /// `--principal` and `--principal-tenant` are placed where the bundle reads
    /// them (a header, the path after the prefix, or metadata); `--header`
    /// adds raw headers, so a request can also be given entirely as Envoy sees it.
    #[command(
        after_help = "Exit status: 0 a decision was printed (whatever it is), 1 the source does not load or the request cannot be expressed with the bundle's settings, 2 usage error (a malformed `--header`, `--claims`, `--context` or `--request`).\n\nExamples:\n  tenantgate check policies --tenant /acme/eu --method GET --path /orders/1 --principal alice\n  echo '{\"tenant\": \"/acme\", \"method\": \"GET\", \"path\": \"/orders\"}' | tenantgate check policies --request -"
    )]
    Check {
        /// A policy folder or a bundle file.
        source: PathBuf,
        /// A request as JSON, the shape of a policy test's `request` and of
        /// `serve`'s `POST /v1/decide` (`-`: standard input). The flags below
        /// are then not given.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["tenant", "method", "path", "principal", "principal_tenant", "headers", "claims", "context"])]
        request: Option<PathBuf>,
        /// The tenant as a client sends it (`/acme/eu`), placed where the bundle reads it.
        #[arg(long)]
        tenant: Option<String>,
        /// The method as sent (`get` is refused with 400, as in Envoy).
        #[arg(long, required_unless_present = "request")]
        method: Option<String>,
        /// The raw path, query included.
        #[arg(long, required_unless_present = "request")]
        path: Option<String>,
        /// The principal id; none or empty: anonymous.
        #[arg(long)]
        principal: Option<String>,
        /// The principal's home tenant, placed where the bundle's `principal_tenant` source reads it.
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
    #[command(
        after_help = "Exit status: 0 every test that ran passed and at least one ran, 1 a test failed, none ran, or the folder or a test file does not load, 2 usage error.\n\nExamples:\n  tenantgate test policies\n  tenantgate test policies --run residency -v\n  tenantgate test policies --format junit > report.xml"
    )]
    Test {
        /// The policy folder (tests in `DIR/tests/*.json`).
        dir: PathBuf,
        /// Run only the tests whose name contains this text.
        #[arg(long, value_name = "TEXT")]
        run: Option<String>,
        /// Print every test, passed ones too.
        #[arg(short, long)]
        verbose: bool,
        /// Refuse the folder's warnings as errors.
        #[arg(long)]
        strict: bool,
        /// `text`, `json` (one object: `passed`, `failed`, `tests`) or `junit` (JUnit XML for CI).
        #[arg(long, value_enum, default_value = "text")]
        format: TestFormat,
    },
    /// Replay a traffic plan against the quotas on a virtual clock (policies are not evaluated).
    #[command(
        after_help = "Exit status: 0 the counts were printed, 1 the source or the plan does not load, 2 usage error.\n\nExample: tenantgate simulate policies --traffic policies/traffic-borrow.json --svg borrow.svg --series borrow.csv"
    )]
    Simulate {
        source: PathBuf,
        /// The traffic plan (JSON).
        #[arg(long)]
        traffic: PathBuf,
        /// Draw admitted requests per second per tenant over time into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Write offered and admitted requests per second per tenant to this file:
        /// CSV (`second,tenant,offered,admitted`), or JSON when it ends in `.json`.
        #[arg(long, value_name = "FILE")]
        series: Option<PathBuf>,
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
    #[command(
        after_help = "Exit status: 0 rendered, 1 the bundle or the module cannot be read, 2 usage error (flags that do not go together, a malformed address, `--sha256`, `--selector` or `--name`).\n\nExamples:\n  tenantgate envoy policies --wasm dist/tenantgate.wasm -o envoy.json\n  tenantgate envoy policies --istio --wasm dist/tenantgate.wasm --namespace shop --selector app=orders"
    )]
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
    #[command(
        after_help = "Exit status: 0 printed, 1 the source does not load, 2 usage error.\n\nExamples:\n  tenantgate limits policies --format ratelimit\n  tenantgate limits policies --format envoy --rls 127.0.0.1:8081"
    )]
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
    #[command(
        after_help = "Exit status: 0 every file is formatted (or was rewritten), 1 `--check` or `--diff` found a file to format, a file does not parse or cannot be read or written, 2 usage error.\n\nExamples:\n  tenantgate fmt policies --check\n  tenantgate fmt policies/tenants/acme/defaults.cedar --diff"
    )]
    Fmt {
        /// A policy folder (every `.cedar` file under `tenants/`) or one `.cedar` file.
        #[arg(value_name = "DIR|FILE")]
        dir: PathBuf,
        /// Write nothing; list the files that would change (exit 1 if any).
        #[arg(long)]
        check: bool,
        /// Write nothing; print a unified diff of each file that would change (exit 1 if any).
        #[arg(long)]
        diff: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  tenantgate completions bash > ~/.local/share/bash-completion/completions/tenantgate\n  tenantgate completions zsh > \"${fpath[1]}/_tenantgate\"\n  tenantgate completions fish > ~/.config/fish/completions/tenantgate.fish"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
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
        #[arg(long, value_name = "IP:PORT", requires = "xds_module")]
        xds: Option<std::net::SocketAddr>,
        /// With `--xds`: the filter module as the Envoys see it (a path on their hosts).
        #[arg(long, value_name = "PATH", requires = "xds", group = "xds_module")]
        wasm: Option<String>,
        /// With `--xds`: serve the native build's config instead (`libtenantgate.so`,
        /// an Envoy dynamic module, as the Envoys see it: a path on their hosts).
        #[arg(long, value_name = "PATH", requires = "xds", group = "xds_module")]
        native: Option<String>,
        /// With `--xds`: `auto` pushes every new version to all nodes; `manual`
        /// keeps it until `POST /v1/rollout`.
        #[arg(long, value_enum, default_value = "auto", requires = "xds")]
        rollout: RolloutMode,
        /// With `--xds`: how many versions to keep for rollouts and rollbacks.
        #[arg(long, default_value_t = tenantgate_serve::rollout::DEFAULT_KEEP, value_name = "N", requires = "xds")]
        keep: usize,
        /// With `--xds`: let requests through when the filter cannot load or crashes (default: refuse them).
        #[arg(long = "fail-open", requires = "xds", conflicts_with = "native")]
        fail_open: bool,
    },
}

/// `serve --rollout`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RolloutMode {
    Auto,
    Manual,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TestFormat {
    Text,
    Json,
    Junit,
}

/// A request as `check` and the policy tests describe it: the engine's
/// [`RequestSpec`], mapped by the filter's own code.
pub type RequestArgs = RequestSpec;

/// Why a command line cannot run, found before any file is read.
struct Usage(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
        Err(Failure::Error(message)) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// A failed command: a usage error (exit 2) or any other (exit 1).
enum Failure {
    Usage(String),
    Error(String),
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::Error(m)
    }
}

impl From<Usage> for Failure {
    fn from(u: Usage) -> Self {
        Failure::Usage(u.0)
    }
}

fn run(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Validate {
            source,
            strict,
            format,
        } => Ok(run_validate(&source, strict, format)),
        Command::Bundle {
            dir,
            output,
            strict,
        } => Ok(run_bundle(&dir, output.as_deref(), strict)?),
        Command::Check {
            source,
            request,
            tenant,
            method,
            path,
            principal,
            principal_tenant,
            headers,
            claims,
            context,
        } => {
            let spec = match request {
                Some(file) => request_file(&file)?,
                None => RequestSpec {
                    tenant,
                    method: method.unwrap_or_default(),
                    path: path.unwrap_or_default(),
                    principal,
                    principal_tenant,
                    headers: header_args(&headers)?,
                    claims: json_arg("--claims", claims.as_deref())?.map(serde_json::Value::Object),
                    context: json_arg("--context", context.as_deref())?,
                    ..RequestSpec::default()
                },
            };
            Ok(run_check(&source, &spec)?)
        }
        Command::Test {
            dir,
            run,
            verbose,
            strict,
            format,
        } => Ok(run_test(&dir, run.as_deref(), verbose, strict, format)?),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "tenantgate", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            source,
            traffic,
            svg,
            series,
        } => Ok(run_simulate(
            &source,
            &traffic,
            svg.as_deref(),
            series.as_deref(),
        )?),
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
        } => {
            render::usage(&options).map_err(Usage)?;
            Ok(run_envoy(&bundle, &options, output.as_deref())?)
        }
        Command::Limits {
            source,
            format,
            domain,
            envoy,
        } => Ok(limits::run(&source, format, domain.as_deref(), &envoy)?),
        Command::Fmt { dir, check, diff } => Ok(fmt::run(&dir, check, diff)?),
        Command::Serve {
            source,
            http,
            grpc,
            xds,
            wasm,
            native,
            rollout,
            keep,
            fail_open,
        } => {
            let xds = xds.map(|addr| tenantgate_serve::xds::Options {
                addr,
                module: match native {
                    Some(path) => tenantgate_serve::xds::Module::Native(path),
                    None => tenantgate_serve::xds::Module::Wasm(wasm.unwrap_or_default()),
                },
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
            .map_err(|e| Failure::Error(format!("tenantgate serve: {e}")))
        }
    }
}

fn run_validate(source: &Path, strict: bool, format: ReportFormat) -> ExitCode {
    let loaded = Bundle::load(source);
    let (ok, diagnostics) = match &loaded {
        Ok(l) => {
            let strict_errors = if strict {
                l.strict_errors()
            } else {
                Vec::new()
            };
            let mut all = l.warnings.clone();
            if strict {
                all.retain(|w| w.severity != Severity::Warning);
                all.extend(strict_errors.iter().cloned());
            }
            (strict_errors.is_empty(), all)
        }
        Err(d) => (false, d.0.clone()),
    };
    if format == ReportFormat::Json {
        let l = loaded.as_ref().ok().filter(|_| ok);
        let report = serde_json::json!({
            "ok": ok,
            "source": source.display().to_string(),
            "version": l.map(|l| l.bundle.version.clone()),
            "tenants": l.map(|l| l.bundle.tenants.len()),
            "policies": l.map(|l| l.engine.policy_count()),
            "diagnostics": diagnostics,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    match loaded {
        Ok(l) if ok => {
            for w in &l.warnings {
                eprintln!("{w}");
            }
            println!(
                "{}: ok: {} tenants, {} policies{}, version {}",
                source.display(),
                l.bundle.tenants.len(),
                l.engine.policy_count(),
                if l.engine.quotas().is_empty() && l.engine.fleet_limits().all().is_empty() {
                    ""
                } else {
                    ", limits valid"
                },
                l.bundle.version
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{}", report(&diagnostics));
            ExitCode::FAILURE
        }
    }
}

/// Diagnostics, then `N error(s)` (warnings and notes not counted).
fn report(diagnostics: &[Diagnostic]) -> String {
    let mut out: Vec<String> = diagnostics.iter().map(|d| d.to_string()).collect();
    let n = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    out.push(format!("{n} error{}", if n == 1 { "" } else { "s" }));
    out.join("\n")
}

/// Loads SOURCE for `bundle` and `test`: warnings and notes printed to
/// standard error; with `strict`, warnings are errors.
fn load_reporting(source: &Path, strict: bool) -> Result<(Bundle, Arc<Engine>), String> {
    let l = Bundle::load(source).map_err(|d| report(&d.0))?;
    if strict {
        let errors = l.strict_errors();
        if !errors.is_empty() {
            let mut all: Vec<Diagnostic> = l
                .warnings
                .iter()
                .filter(|w| w.severity != Severity::Warning)
                .cloned()
                .collect();
            all.extend(errors);
            return Err(report(&all));
        }
    }
    for w in &l.warnings {
        eprintln!("{w}");
    }
    Ok((l.bundle, Arc::new(l.engine)))
}

fn run_bundle(dir: &Path, output: Option<&Path>, strict: bool) -> Result<ExitCode, String> {
    if !dir.is_dir() {
        return Err(format!(
            "{}: error: not a policy folder (`bundle` compiles a folder; `validate` checks a bundle file)",
            dir.display()
        ));
    }
    let (bundle, _) = load_reporting(dir, strict)?;
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

/// `check --request FILE` (`-`: standard input).
fn request_file(file: &Path) -> Result<RequestSpec, Usage> {
    let shown = if file == Path::new("-") {
        "standard input".to_string()
    } else {
        format!("`{}`", file.display())
    };
    let text = if file == Path::new("-") {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
            .map_err(|e| Usage(format!("error: `--request`: cannot read {shown}: {e}")))?;
        t
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Usage(format!("error: `--request`: cannot read {shown}: {e}")))?
    };
    if !text.trim_start().starts_with('{') {
        return Err(Usage(format!(
            "error: `--request`: {shown} is not a JSON object (a request: `{{\"tenant\", \"method\", \"path\", ...}}`, as in a policy test)"
        )));
    }
    serde_json::from_str(&text).map_err(|e| {
        Usage(format!(
            "error: `--request`: {shown}:{}:{}: {}",
            e.line(),
            e.column(),
            strip_location(&e.to_string())
        ))
    })
}

fn strip_location(msg: &str) -> &str {
    msg.rfind(" at line ")
        .and_then(|i| msg.get(..i))
        .unwrap_or(msg)
}

/// `--header name=value` flags as raw headers (names lowercased, values as given).
fn header_args(headers: &[String]) -> Result<Vec<(String, String)>, Usage> {
    let mut out = Vec::new();
    for h in headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| Usage(format!("error: `--header {h}` must be `name=value`")))?;
        out.push((k.trim().to_ascii_lowercase(), v.to_string()));
    }
    Ok(out)
}

/// A flag holding a JSON object.
fn json_arg(
    flag: &str,
    text: Option<&str>,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, Usage> {
    text.map(|t| {
        serde_json::from_str(t)
            .map_err(|e| Usage(format!("error: `{flag}` is not a JSON object: {e}")))
    })
    .transpose()
}

/// The keys of the context tenantgate builds (docs/reference.md, "The Cedar
/// entity model"); `--context` with another key gets a warning.
const CONTEXT_KEYS: [&str; 7] = [
    "method",
    "path",
    "time",
    "headers",
    "host",
    "source_ip",
    "claims",
];
const TIME_KEYS: [&str; 3] = ["epoch_s", "hour_utc", "weekday"];

/// Warnings for `--context` keys no policy reads from the filter's context.
fn context_warnings(context: Option<&serde_json::Map<String, serde_json::Value>>) -> Vec<String> {
    let mut out = Vec::new();
    let Some(context) = context else {
        return out;
    };
    for (k, v) in context {
        if !CONTEXT_KEYS.contains(&k.as_str()) {
            out.push(format!(
                "warning: `--context`: `{k}` is not a key of the context the filter builds ({}); a policy reading it would see it here only",
                CONTEXT_KEYS.join(", ")
            ));
        } else if k == "time" {
            for tk in v.as_object().into_iter().flat_map(|m| m.keys()) {
                if !TIME_KEYS.contains(&tk.as_str()) {
                    out.push(format!(
                        "warning: `--context`: `time.{tk}` is not a key of `time` ({})",
                        TIME_KEYS.join(", ")
                    ));
                }
            }
        }
    }
    out
}

fn run_check(source: &Path, spec: &RequestSpec) -> Result<ExitCode, String> {
    let (_, engine) = load(source)?;
    for w in context_warnings(spec.context.as_ref()) {
        eprintln!("{w}");
    }
    // Quotas charged in a fresh in-memory store: what a first request gets.
    let store = tenantgate_engine::quota::MemoryStore::new();
    let out = Worker::new(engine)
        .check_output(spec, now_ns(), Some(&store))
        .map_err(|e| format!("error: {e}"))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
    );
    Ok(ExitCode::SUCCESS)
}

fn run_test(
    dir: &Path,
    only: Option<&str>,
    verbose: bool,
    strict: bool,
    format: TestFormat,
) -> Result<ExitCode, String> {
    let (_, engine) = load_reporting(dir, strict)?;
    let tests = policytest::load(dir).map_err(|e| e.join("\n"))?;
    let total = tests.len();
    let selected: Vec<_> = tests
        .iter()
        .filter(|t| only.is_none_or(|o| t.test.name.contains(o)))
        .collect();
    if selected.is_empty() {
        return Err(if total == 0 {
            format!(
                "{}: error: no test ran: no test in `*.json` files of this folder (docs/reference.md, \"Policy tests\")",
                dir.join("tests").display()
            )
        } else {
            format!(
                "error: no test ran: no test name contains `{}` ({total} tests)",
                only.unwrap_or_default()
            )
        });
    }
    let results: Vec<(&policytest::LoadedTest, Result<(), String>)> = selected
        .iter()
        .map(|t| (*t, policytest::run(&engine, &t.test).map(|_| ())))
        .collect();
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    let passed = results.len() - failed;
    match format {
        TestFormat::Text => {
            for (t, r) in &results {
                match r {
                    Ok(()) if verbose => println!("ok   {}: {}", t.file, t.test.name),
                    Ok(()) => {}
                    Err(why) => println!("FAIL {}: {}: {why}", t.file, t.test.name),
                }
            }
            let skipped = total - results.len();
            if skipped > 0 {
                println!("{passed} passed, {failed} failed, {skipped} not run (`--run`)");
            } else {
                println!("{passed} passed, {failed} failed");
            }
        }
        TestFormat::Json => {
            let tests: Vec<_> = results
                .iter()
                .map(|(t, r)| {
                    serde_json::json!({
                        "file": t.file,
                        "name": t.test.name,
                        "passed": r.is_ok(),
                        "failure": r.as_ref().err(),
                    })
                })
                .collect();
            let out = serde_json::json!({ "passed": passed, "failed": failed, "tests": tests });
            println!(
                "{}",
                serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
            );
        }
        TestFormat::Junit => print!("{}", junit(dir, &results, failed)),
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// JUnit XML: one `testsuite` per tests file.
fn junit(
    dir: &Path,
    results: &[(&policytest::LoadedTest, Result<(), String>)],
    failed: usize,
) -> String {
    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"{}\" tests=\"{}\" failures=\"{failed}\">\n",
        esc(&dir.display().to_string()),
        results.len()
    );
    let mut files: Vec<&str> = results.iter().map(|(t, _)| t.file.as_str()).collect();
    files.dedup();
    for file in files {
        let suite: Vec<_> = results.iter().filter(|(t, _)| t.file == file).collect();
        let fails = suite.iter().filter(|(_, r)| r.is_err()).count();
        out.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{fails}\">\n",
            esc(file),
            suite.len()
        ));
        for (t, r) in suite {
            let name = esc(&t.test.name);
            match r {
                Ok(()) => out.push_str(&format!(
                    "    <testcase name=\"{name}\" classname=\"{}\"/>\n",
                    esc(file)
                )),
                Err(why) => out.push_str(&format!(
                    "    <testcase name=\"{name}\" classname=\"{}\">\n      <failure message=\"{}\"/>\n    </testcase>\n",
                    esc(file),
                    esc(why)
                )),
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

fn run_simulate(
    source: &Path,
    traffic: &Path,
    svg: Option<&Path>,
    series: Option<&Path>,
) -> Result<ExitCode, String> {
    let (bundle, engine) = load(source)?;
    let text = std::fs::read_to_string(traffic)
        .map_err(|e| format!("{}: error: cannot read: {e}", traffic.display()))?;
    let out = simulate::run_with(&bundle, &engine, &text, svg, series)
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

/// Loads a policy folder or a bundle file and compiles it (warnings not shown).
pub fn load(source: &Path) -> Result<(Bundle, Arc<Engine>), String> {
    let l = Bundle::load(source).map_err(|d| report(&d.0))?;
    Ok((l.bundle, Arc::new(l.engine)))
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
